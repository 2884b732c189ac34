//! Datagram transports for the gossip node: a UDP socket, or an in-memory twin.
//!
//! The owner loop runs unchanged over both. The in-memory network delivers datagrams
//! between in-process nodes through bounded channels (dropping when a queue is full or the
//! destination is gone, like UDP), so multi-node scenarios run in one test process under
//! `tokio::time::pause()`. It can also cut links to simulate partitions.
//!
//! Owns moving bytes only: no framing, no crypto, no protocol decisions.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

pub(crate) enum Transport {
    Udp(UdpSocket),
    #[cfg_attr(not(test), allow(dead_code))]
    Mem(MemSocket),
}

impl Transport {
    /// Receive one datagram into `buf`. Cancel-safe.
    pub(crate) async fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            Transport::Udp(s) => s.recv_from(buf).await,
            Transport::Mem(s) => s.recv(buf).await,
        }
    }

    /// Send one datagram. Delivery is not guaranteed (UDP semantics).
    pub(crate) async fn send(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        match self {
            Transport::Udp(s) => s.send_to(data, to).await.map(|_| ()),
            Transport::Mem(s) => {
                s.send(data, to);
                Ok(())
            }
        }
    }
}

type Datagram = (Vec<u8>, SocketAddr);

/// A simulated network of in-process nodes.
#[derive(Clone, Default)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct MemNetwork {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Default)]
struct MemInner {
    nodes: HashMap<SocketAddr, mpsc::Sender<Datagram>>,
    /// Directed links that drop everything.
    cut: HashSet<(SocketAddr, SocketAddr)>,
    /// Extra addresses that reach a node (like a NAT or 127.0.0.1).
    aliases: HashMap<SocketAddr, SocketAddr>,
    /// One-way delay of every datagram.
    latency: std::time::Duration,
}

#[cfg_attr(not(test), allow(dead_code))]
impl MemNetwork {
    fn inner(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attach a socket at `addr` (replacing a previous one there, as a restarted process).
    pub(crate) fn bind(&self, addr: SocketAddr) -> MemSocket {
        let (tx, rx) = mpsc::channel(1024);
        self.inner().nodes.insert(addr, tx.clone());
        MemSocket {
            addr,
            net: self.clone(),
            tx,
            rx,
        }
    }

    /// A network where every datagram takes `latency` to arrive.
    pub(crate) fn with_latency(latency: std::time::Duration) -> MemNetwork {
        let net = MemNetwork::default();
        net.inner().latency = latency;
        net
    }

    /// Drop every datagram between `a` and `b`, both ways.
    pub(crate) fn partition(&self, a: SocketAddr, b: SocketAddr) {
        let mut inner = self.inner();
        inner.cut.insert((a, b));
        inner.cut.insert((b, a));
    }

    /// Deliver datagrams sent to `alias` to the node at `target`.
    pub(crate) fn alias(&self, alias: SocketAddr, target: SocketAddr) {
        self.inner().aliases.insert(alias, target);
    }

    pub(crate) fn heal(&self) {
        self.inner().cut.clear();
    }
}

pub(crate) struct MemSocket {
    addr: SocketAddr,
    net: MemNetwork,
    /// Our own sender, to recognise our registration on drop.
    tx: mpsc::Sender<Datagram>,
    rx: mpsc::Receiver<Datagram>,
}

impl MemSocket {
    async fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self.rx.recv().await {
            Some((data, from)) => {
                // Truncate like a datagram socket would.
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                Ok((n, from))
            }
            None => std::future::pending().await,
        }
    }

    fn send(&self, data: &[u8], to: SocketAddr) {
        let inner = self.net.inner();
        let to = inner.aliases.get(&to).copied().unwrap_or(to);
        if inner.cut.contains(&(self.addr, to)) {
            return;
        }
        let Some(tx) = inner.nodes.get(&to) else {
            return;
        };
        let datagram = (data.to_vec(), self.addr);
        if inner.latency.is_zero() {
            let _ = tx.try_send(datagram);
        } else {
            let (tx, latency) = (tx.clone(), inner.latency);
            tokio::spawn(async move {
                tokio::time::sleep(latency).await;
                let _ = tx.try_send(datagram);
            });
        }
    }
}

impl Drop for MemSocket {
    fn drop(&mut self) {
        let mut inner = self.net.inner();
        if inner
            .nodes
            .get(&self.addr)
            .is_some_and(|tx| tx.same_channel(&self.tx))
        {
            inner.nodes.remove(&self.addr);
        }
    }
}
