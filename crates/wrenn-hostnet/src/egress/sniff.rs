//! The name a connection carries in its first bytes: the SNI of a TLS ClientHello (port 443)
//! or the `Host` header of an HTTP/1.x request (port 80). Nothing is decrypted or changed:
//! the proxy only looks, then forwards the same bytes.
//!
//! Both parsers take everything read so far and say whether they need more, or are done with
//! a name or without one. Malformed, truncated-for-good or oversized input is "done, no name"
//! (the connection is then judged by its address alone); no input makes them panic.

/// Most bytes read before a name must have shown up.
pub(crate) const MAX_SNIFF: usize = 16 * 1024;

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sniff {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// Done: the name (lowercase, without a trailing dot), or none (absent or malformed).
    Done(Option<String>),
}

/// TLS content type of handshake records.
const HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Extension type `server_name` (RFC 6066).
const SERVER_NAME: u16 = 0;
/// Largest TLS plaintext record payload (2^14, RFC 8446 section 5.1).
const MAX_RECORD: usize = 1 << 14;

/// The SNI of the ClientHello at the start of `buf`, which may be split across several
/// handshake records and across reads.
pub(crate) fn tls_sni(buf: &[u8]) -> Sniff {
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            return Sniff::NeedMore;
        }
        let (kind, major, len) = (
            rest[0],
            rest[1],
            usize::from(u16::from_be_bytes([rest[3], rest[4]])),
        );
        if kind != HANDSHAKE || major != 3 || len == 0 || len > MAX_RECORD {
            return Sniff::Done(None);
        }
        let Some(fragment) = rest.get(5..5 + len) else {
            // Only what the record holds so far; the message may already be complete.
            handshake.extend_from_slice(&rest[5..]);
            return client_hello(&handshake);
        };
        handshake.extend_from_slice(fragment);
        rest = &rest[5 + len..];
        match client_hello(&handshake) {
            Sniff::NeedMore => {}
            done => return done,
        }
    }
}

/// The SNI of a ClientHello handshake message (header included), possibly incomplete.
fn client_hello(msg: &[u8]) -> Sniff {
    if msg.len() < 4 {
        return Sniff::NeedMore;
    }
    let len = usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]);
    if msg[0] != CLIENT_HELLO || len > MAX_SNIFF {
        return Sniff::Done(None);
    }
    match msg.get(4..4 + len) {
        Some(body) => Sniff::Done(hello_sni(body)),
        None => Sniff::NeedMore,
    }
}

/// A cursor over a byte slice whose reads fail past the end instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// The host name in a complete ClientHello body; `None` without one or when malformed.
fn hello_sni(body: &[u8]) -> Option<String> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    let session = r.vec8()?;
    let suites = r.vec16()?;
    let compression = r.vec8()?;
    if session.len() > 32 || suites.is_empty() || suites.len() % 2 != 0 || compression.is_empty() {
        return None;
    }
    if r.0.is_empty() {
        return None; // no extensions at all
    }
    let mut exts = Reader(r.vec16()?);
    let mut sni = None;
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind == SERVER_NAME {
            if sni.is_some() {
                return None; // a repeated extension is a malformed hello
            }
            sni = Some(server_name(data)?);
        }
    }
    sni.flatten()
}

/// The `server_name` extension's host name. `None`: malformed; `Some(None)`: no usable name.
fn server_name(data: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec16()?);
    if !r.0.is_empty() {
        return None;
    }
    while !list.0.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind == 0 {
            return Some(host_name(name));
        }
    }
    Some(None)
}

/// Most headers an HTTP request head may have for its `Host` to count.
const MAX_HEADERS: usize = 64;

/// The `Host` of the HTTP/1.x request head at the start of `buf`, without its port.
pub(crate) fn http_host(buf: &[u8]) -> Sniff {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() < MAX_SNIFF => Sniff::NeedMore,
        Ok(httparse::Status::Partial) | Err(_) => Sniff::Done(None),
        Ok(httparse::Status::Complete(_)) => {
            let mut hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"));
            match (hosts.next(), hosts.next()) {
                // Two `Host` headers: which one a server believes is anybody's guess.
                (Some(h), None) => Sniff::Done(strip_port(h.value).and_then(host_name)),
                _ => Sniff::Done(None),
            }
        }
    }
}

/// `host[:port]` without the port; `None` for an IPv6 literal or a bad port.
fn strip_port(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    if value.first() == Some(&b'[') {
        return None;
    }
    match value.iter().rposition(|&b| b == b':') {
        None => Some(value),
        Some(i) => {
            let port = &value[i + 1..];
            (!port.is_empty() && port.len() <= 5 && port.iter().all(u8::is_ascii_digit))
                .then_some(&value[..i])
        }
    }
}

/// A DNS host name as a guest may send it (letters, digits, `-`, `_`, dots; at most 253
/// characters; not an address), lowercase without a trailing dot; `None` otherwise.
pub(crate) fn host_name(raw: &[u8]) -> Option<String> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    let ok = !raw.is_empty()
        && raw.len() <= 253
        && raw.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && !raw.iter().all(|&b| b.is_ascii_digit() || b == b'.');
    ok.then(|| String::from_utf8_lossy(raw).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `server_name` extension naming `name`.
    fn sni_ext(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![0u8];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name);
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        let mut ext = SERVER_NAME.to_be_bytes().to_vec();
        ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
        ext.extend_from_slice(&list);
        ext
    }

    /// A TLS 1.3 style ClientHello handshake message (without record framing) with the
    /// extensions `exts` and supported_versions.
    fn hello_with(exts: &[u8]) -> Vec<u8> {
        let mut exts = exts.to_vec();
        exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(32);
        body.extend_from_slice(&[9u8; 32]);
        body.extend_from_slice(&[0x00, 0x04, 0x13, 0x01, 0x13, 0x02, 0x01, 0x00]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    fn hello_message(sni: Option<&[u8]>) -> Vec<u8> {
        hello_with(&sni.map(sni_ext).unwrap_or_default())
    }

    /// `msg` in handshake records of at most `chunk` bytes each.
    fn records(msg: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in msg.chunks(chunk) {
            out.extend_from_slice(&[HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn done(name: &str) -> Sniff {
        Sniff::Done(Some(name.into()))
    }

    #[test]
    fn finds_the_sni_in_one_record_or_many_and_after_any_split() {
        let msg = hello_message(Some(b"Allowed.Test."));
        for chunk in [msg.len(), 100, 7, 1] {
            let bytes = records(&msg, chunk);
            assert_eq!(tls_sni(&bytes), done("allowed.test"), "records of {chunk}");
            // Every strict prefix (a read that stopped early) asks for more.
            for cut in 0..bytes.len() {
                assert_eq!(tls_sni(&bytes[..cut]), Sniff::NeedMore, "{chunk}/{cut}");
            }
        }
        // Bytes after the ClientHello (early data, a second record) change nothing.
        let mut more = records(&msg, msg.len());
        more.extend_from_slice(&[23, 3, 3, 0, 2, 1, 2]);
        assert_eq!(tls_sni(&more), done("allowed.test"));
    }

    #[test]
    fn a_hello_without_a_usable_name_has_none() {
        let none = records(&hello_message(None), 4096);
        assert_eq!(tls_sni(&none), Sniff::Done(None));
        for bad in [
            &b"a b.test"[..],
            b"",
            b"203.0.113.10",
            b"x..test",
            &[0xff; 10],
        ] {
            let bytes = records(&hello_message(Some(bad)), 4096);
            assert_eq!(tls_sni(&bytes), Sniff::Done(None), "{bad:?}");
        }
        let long = vec![b'a'; 300];
        assert_eq!(
            tls_sni(&records(&hello_message(Some(&long)), 4096)),
            Sniff::Done(None)
        );
    }

    #[test]
    fn malformed_tls_is_done_without_a_name() {
        // Not a handshake record, an SSLv2-style hello, an oversized record, a record of the
        // right type holding another handshake message.
        for bytes in [
            &b"GET / HTTP/1.1\r\n"[..],
            &[0x80, 0x2e, 0x01, 0x03, 0x01],
            &[HANDSHAKE, 3, 1, 0x50, 0x00],
            &[HANDSHAKE, 3, 1, 0, 0],
            &[HANDSHAKE, 3, 1, 0, 4, 2, 0, 0, 0],
        ] {
            assert_eq!(tls_sni(bytes), Sniff::Done(None), "{bytes:?}");
        }
        // A ClientHello claiming more than the sniff limit.
        assert_eq!(
            tls_sni(&[HANDSHAKE, 3, 1, 0, 4, CLIENT_HELLO, 0xff, 0xff, 0xff]),
            Sniff::Done(None)
        );
        // Every byte of a valid hello flipped in turn, and every truncation of its body with
        // the lengths left as they were: never a panic; a name only when still well formed.
        let msg = hello_message(Some(b"allowed.test"));
        for i in 0..msg.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut m = msg.clone();
                m[i] ^= flip;
                let _ = tls_sni(&records(&m, 4096));
            }
            let _ = hello_sni(&msg[4..4 + i.min(msg.len() - 4)]);
        }
        // A repeated SNI extension.
        let twice = [sni_ext(b"a.test"), sni_ext(b"a.test")].concat();
        assert_eq!(
            tls_sni(&records(&hello_with(&twice), 4096)),
            Sniff::Done(None)
        );
    }

    #[test]
    fn deterministic_garbage_never_panics() {
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..2000 {
            let len = (next() % 600) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 && bytes.len() > 5 {
                bytes[0] = HANDSHAKE;
                bytes[1] = 3;
            }
            let _ = tls_sni(&bytes);
            let _ = http_host(&bytes);
        }
    }

    #[test]
    fn finds_the_host_header_without_its_port() {
        let req = b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nHOST: Allowed.Test:8080\r\n\r\nbody";
        assert_eq!(http_host(req), done("allowed.test"));
        for cut in 0..req.len() - 4 {
            assert_eq!(http_host(&req[..cut]), Sniff::NeedMore, "{cut}");
        }
        assert_eq!(
            http_host(b"GET / HTTP/1.0\r\nhost: a.test.\r\n\r\n"),
            done("a.test")
        );
        assert_eq!(
            http_host(b"POST / HTTP/1.1\r\nHost:   a.test  \r\n\r\n"),
            done("a.test")
        );
    }

    #[test]
    fn bad_or_missing_hosts_are_no_name() {
        for req in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: 203.0.113.10:80\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test:\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test:99999x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x16\x03\x01\x00\x05hello",
        ] {
            assert_eq!(
                http_host(req),
                Sniff::Done(None),
                "{:?}",
                String::from_utf8_lossy(req)
            );
        }
        // Too many headers, and a head that never ends within the limit.
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"Host: a.test\r\n\r\n");
        assert_eq!(http_host(&many), Sniff::Done(None));
        let mut endless = b"GET / HTTP/1.1\r\nX: ".to_vec();
        endless.resize(MAX_SNIFF, b'a');
        assert_eq!(http_host(&endless), Sniff::Done(None));
    }

    #[test]
    fn host_names_are_checked() {
        assert_eq!(host_name(b"A.b-c.D_e."), Some("a.b-c.d_e".into()));
        assert_eq!(host_name(b"localhost"), Some("localhost".into()));
        for bad in [
            &b""[..],
            b".",
            b"a..b",
            b"1.2.3.4",
            b"a/b",
            b"*.a.test",
            &[b'a'; 254],
        ] {
            assert_eq!(host_name(bad), None, "{bad:?}");
        }
        assert_eq!(host_name(&[b'a'; 64]), None);
    }
}
