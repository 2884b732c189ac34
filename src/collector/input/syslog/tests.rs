use super::*;
use proptest::prelude::*;
use serde_json::Value;

/// 2024-05-01T12:00:00Z
const NOW: i64 = 1_714_564_800_000_000_000;

fn parse(msg: &[u8]) -> (Value, String, Parsed) {
    let mut p = SyslogParser::new(1 << 20);
    let r = p.parse(msg, NOW);
    let v: Value = serde_json::from_slice(&p.obj)
        .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&p.obj)));
    (v, p.tag.clone(), r)
}

#[test]
fn rfc5424_with_structured_data() {
    let (v, tag, r) = parse(
        b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog 99 ID47 \
          [exampleSDID@32473 iut=\"3\" eventSource=\"Appl\\\"ication\" eventID=\"1011\"]\
          [examplePriority@32473 class=\"high\"] \xEF\xBB\xBFAn application event\n",
    );
    assert!(r.ok && !r.truncated);
    assert_eq!(tag, "evntslog");
    assert_eq!(v["facility"], "local4");
    assert_eq!(v["severity"], "notice");
    assert_eq!(v["hostname"], "mymachine.example.com");
    assert_eq!(v["appname"], "evntslog");
    assert_eq!(v["procid"], "99");
    assert_eq!(v["msgid"], "ID47");
    assert_eq!(v["timestamp"], "2003-10-11T22:14:15.003Z");
    assert_eq!(
        v["structured_data"]["exampleSDID@32473"]["eventSource"],
        "Appl\"ication"
    );
    assert_eq!(
        v["structured_data"]["examplePriority@32473"]["class"],
        "high"
    );
    assert_eq!(v["message"], "An application event");
    assert_eq!(r.ts, 1_065_910_455_003_000_000);
}

#[test]
fn rfc5424_nil_values_and_malformed_structured_data() {
    let (v, tag, r) = parse(b"<13>1 - - - - - -");
    assert!(r.ok);
    assert_eq!(r.ts, NOW);
    assert_eq!(tag, "syslog");
    assert_eq!(v["facility"], "user");
    assert_eq!(v["message"], "");
    assert!(v.get("hostname").is_none() && v.get("structured_data").is_none());

    let (v, _, _) = parse(b"<13>1 2024-05-01T12:00:00Z h app - - [bad sd here] the msg");
    assert_eq!(v["structured_data"], "[bad sd here]");
    assert_eq!(v["message"], "the msg");

    let (v, _, r) = parse(b"<13>1 2024-05-01T12:00:00Z h");
    assert!(r.ok);
    assert_eq!(v["message"], "2024-05-01T12:00:00Z h");
}

#[test]
fn rfc3164_variants() {
    let (v, tag, r) = parse(b"<34>Oct 11 22:14:15 mymachine su[230]: 'su root' failed");
    assert!(r.ok);
    assert_eq!(tag, "su");
    assert_eq!(v["facility"], "auth");
    assert_eq!(v["severity"], "crit");
    assert_eq!(v["hostname"], "mymachine");
    assert_eq!(v["procid"], "230");
    assert_eq!(v["timestamp"], "Oct 11 22:14:15");
    assert_eq!(v["message"], "'su root' failed");
    // Oct 11 is after "now" (May 1st 2024): last year's
    assert_eq!(r.ts, 1_697_062_455_000_000_000);

    let (v, tag, r) = parse(b"<13>May  1 11:59:00 myapp: no host");
    assert_eq!(tag, "myapp");
    assert!(v.get("hostname").is_none());
    assert_eq!(v["message"], "no host");
    assert_eq!(r.ts, NOW - 60_000_000_000);

    let (v, tag, _) = parse(b"<13>2024-05-01T10:00:00+00:00 host app: rsyslog style");
    assert_eq!(
        (v["hostname"].as_str(), tag.as_str()),
        (Some("host"), "app")
    );

    let (v, tag, r) = parse(b"<13>just some text");
    assert!(r.ok);
    assert_eq!(tag, "syslog");
    assert_eq!(v["message"], "just some text");
}

#[test]
fn malformed_messages_are_kept_raw() {
    for m in [
        &b"no pri"[..],
        b"<>x",
        b"<192>x",
        b"<01>x",
        b"<1a>x",
        b"<13",
    ] {
        let (v, tag, r) = parse(m);
        assert!(!r.ok, "{}", String::from_utf8_lossy(m));
        assert_eq!(tag, "syslog");
        assert_eq!(v["message"], String::from_utf8_lossy(m).as_ref());
    }
    let (v, _, _) = parse(b"<13>bad \xFF utf8");
    assert_eq!(v["message"], "bad \u{FFFD} utf8");
}

#[test]
fn long_messages_are_cut_to_the_limit() {
    let mut p = SyslogParser::new(200);
    let mut m = b"<13>1 2024-05-01T12:00:00Z h app - - - ".to_vec();
    m.extend(std::iter::repeat_n(b'"', 300));
    let r = p.parse(&m, NOW);
    assert!(r.truncated);
    assert!(p.obj.len() <= 200, "{}", p.obj.len());
    let v: Value = serde_json::from_slice(&p.obj).unwrap();
    assert!(v["message"].as_str().unwrap().starts_with("\"\"\""));
}

fn frames(f: &mut TcpFramer, chunks: &[&[u8]]) -> Vec<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    for c in chunks {
        f.feed(c, |fr, t| out.push((fr.to_vec(), t)));
    }
    f.finish(|fr, t| out.push((fr.to_vec(), t)));
    out
}

#[test]
fn framing_octet_counted_and_newline() {
    let mut f = TcpFramer::new(1000);
    let got = frames(
        &mut f,
        &[
            b"11 <13>1 hello",
            b"\n<13>line one\n\n5 ab",
            b"cd\n<13>last",
        ],
    );
    let want: Vec<(Vec<u8>, bool)> = vec![
        (b"<13>1 hello".to_vec(), false),
        (b"<13>line one".to_vec(), false),
        (b"ab".to_vec(), false), // "5 ab" then "cd\n": 5 octets = "abcd\n"
        (b"<13>last".to_vec(), false),
    ];
    assert_eq!(got[0], want[0]);
    assert_eq!(got[1], want[1]);
    assert_eq!(got[2], (b"abcd\n".to_vec(), false));
    assert_eq!(got[3], want[3]);
    assert_eq!(got.len(), 4);

    let mut f = TcpFramer::new(1000);
    let got = frames(&mut f, &[b"2024-05-01 is not a length\n"]);
    assert_eq!(got, vec![(b"2024-05-01 is not a length".to_vec(), false)]);
}

#[test]
fn framing_bounds_oversized_frames() {
    let mut f = TcpFramer::new(4);
    let got = frames(&mut f, &[b"10 0123456789", b"abcdefgh\nok\n", b"9 abc"]);
    assert_eq!(
        got,
        vec![
            (b"0123".to_vec(), true),
            (b"abcd".to_vec(), true),
            (b"ok".to_vec(), false),
            (b"abc".to_vec(), true), // cut short by the end of the connection
        ]
    );
}

proptest! {
    #[test]
    fn framing_over_any_split(
        msgs in proptest::collection::vec(("[^\n]{0,40}", any::<bool>()), 1..8),
        cuts in proptest::collection::vec(0usize..2000, 0..8),
    ) {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (m, counted) in &msgs {
            let m = format!("<13>{m}");
            if *counted {
                stream.extend_from_slice(format!("{} ", m.len()).as_bytes());
                stream.extend_from_slice(m.as_bytes());
            } else {
                stream.extend_from_slice(m.as_bytes());
                stream.push(b'\n');
            }
            want.push(m.into_bytes());
        }
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut prev = 0;
        for c in cuts {
            chunks.push(&stream[prev..c]);
            prev = c;
        }
        chunks.push(&stream[prev..]);
        let mut f = TcpFramer::new(1 << 16);
        let got: Vec<Vec<u8>> = frames(&mut f, &chunks).into_iter().map(|(m, t)| {
            assert!(!t);
            m
        }).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn parser_always_yields_a_json_object(msg in proptest::collection::vec(any::<u8>(), 0..300), max in 64usize..400) {
        let mut p = SyslogParser::new(max);
        let r = p.parse(&msg, NOW);
        let v: Value = serde_json::from_slice(&p.obj).unwrap();
        prop_assert!(v.is_object());
        prop_assert!(!p.tag.is_empty());
        if !r.ok {
            prop_assert_eq!(v.as_object().unwrap().len(), 1);
        }
    }

    #[test]
    fn bsd_time_is_never_more_than_a_day_ahead(
        mon in 0usize..12, day in 1u32..29, h in 0u32..24, m in 0u32..60,
        now_s in 0i64..4_000_000_000,
    ) {
        const M: [&str; 12] = ["Jan","Feb","Mar","Apr","May","Jun","Jul","Aug","Sep","Oct","Nov","Dec"];
        let s = format!("{} {day:>2} {h:02}:{m:02}:00", M[mon]);
        let now = now_s * 1_000_000_000;
        let t = bsd_time(s.as_bytes(), now).unwrap();
        prop_assert!(t <= now + 86_400 * 1_000_000_000);
        prop_assert!(t > now - 367 * 86_400 * 1_000_000_000);
    }
}
