//! A tiny HTTP/1.1 client for the REST command path: one keep-alive connection, one
//! request at a time (no pipelining), `Content-Length` or chunked answers. Just enough to
//! POST JSON to the admin API as fast as a connection allows, with no client library's
//! pool or buffering in the measured path.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer head (status line and headers) accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest answer body accepted.
const MAX_BODY: usize = 1024 * 1024;

/// An answer: its status, body, and whether the server closes the connection after it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    pub close: bool,
}

/// Why a request got no answer. After any error the connection is unusable.
#[derive(Debug)]
pub enum Error {
    Io(std::io::ErrorKind),
    /// The server closed the connection before a whole answer arrived.
    Closed,
    /// The answer is not HTTP/1.x as this client reads it.
    Malformed(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(k) => write!(f, "{k}"),
            Error::Closed => write!(f, "closed by server"),
            Error::Malformed(what) => write!(f, "malformed answer: {what}"),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Io(e.kind())
    }
}

pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// `Host` and, with a token, `Authorization` header lines, ready to send.
    headers: String,
    out: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr, token: Option<&str>) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut headers = format!("Host: {addr}\r\n");
        if let Some(t) = token {
            headers.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(4096),
            headers,
            out: Vec::with_capacity(512),
        })
    }

    /// POSTs a JSON body to `path` (one write) and reads the whole answer.
    pub async fn post_json(&mut self, path: &str, body: &[u8]) -> Result<Answer, Error> {
        self.out.clear();
        self.out.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                self.headers,
                body.len()
            )
            .as_bytes(),
        );
        self.out.extend_from_slice(body);
        self.stream.write_all(&self.out).await?;
        self.read_answer().await
    }

    async fn fill(&mut self) -> Result<(), Error> {
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(Error::Closed);
        }
        Ok(())
    }

    async fn read_answer(&mut self) -> Result<Answer, Error> {
        let head_len = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(Error::Malformed("head too large"));
            }
            self.fill().await?;
        };
        let head = self.buf.split_to(head_len);
        let head = parse_head(&head)?;
        let body = match head.length {
            Length::Fixed(n) => {
                if n > MAX_BODY {
                    return Err(Error::Malformed("body too large"));
                }
                while self.buf.len() < n {
                    self.fill().await?;
                }
                self.buf.split_to(n).to_vec()
            }
            Length::Chunked => self.read_chunked().await?,
        };
        Ok(Answer {
            status: head.status,
            body,
            close: head.close,
        })
    }

    async fn read_chunked(&mut self) -> Result<Vec<u8>, Error> {
        let mut body = Vec::new();
        loop {
            let line = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(Error::Malformed("chunk size line too long"));
                }
                self.fill().await?;
            };
            let size_text =
                std::str::from_utf8(&self.buf[..line]).map_err(|_| Error::Malformed("chunk size"))?;
            // Chunk extensions (`;name=value`) are allowed and ignored.
            let size_text = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| Error::Malformed("chunk size"))?;
            self.buf.advance(line + 2);
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        self.buf.advance(i + 2);
                        if i == 0 {
                            return Ok(body);
                        }
                        continue;
                    }
                    if self.buf.len() > MAX_HEAD {
                        return Err(Error::Malformed("trailers too long"));
                    }
                    self.fill().await?;
                }
            }
            if body.len() + size > MAX_BODY {
                return Err(Error::Malformed("body too large"));
            }
            while self.buf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.buf[..size]);
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err(Error::Malformed("chunk not followed by CRLF"));
            }
            self.buf.advance(size + 2);
        }
    }
}

#[derive(Debug, PartialEq)]
enum Length {
    Fixed(usize),
    Chunked,
}

#[derive(Debug)]
struct Head {
    status: u16,
    length: Length,
    close: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(head: &[u8]) -> Result<Head, Error> {
    let text = std::str::from_utf8(head).map_err(|_| Error::Malformed("head not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(Error::Malformed("status line"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(Error::Malformed("status code"))?;
    let mut length = None;
    let mut close = version == "HTTP/1.0";
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(Error::Malformed("header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| Error::Malformed("content-length"))?;
            length = Some(Length::Fixed(n));
        } else if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            length = Some(Length::Chunked);
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    // 1xx, 204 and 304 carry no body; otherwise this client needs a length (a body
    // delimited by the connection's end is not used by the admin API).
    let length = match (status, length) {
        (100..=199 | 204 | 304, _) => Length::Fixed(0),
        (_, Some(l)) => l,
        (_, None) => return Err(Error::Malformed("no content-length")),
    };
    Ok(Head {
        status,
        length,
        close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn heads() {
        let h = parse_head(b"HTTP/1.1 202 Accepted\r\ncontent-length: 12\r\n\r\n").expect("head");
        assert_eq!((h.status, &h.length, h.close), (202, &Length::Fixed(12), false));
        let h = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            .expect("head");
        assert_eq!((h.status, &h.length, h.close), (200, &Length::Chunked, true));
        let h = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n").expect("head");
        assert_eq!(h.length, Length::Fixed(0));
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 abc OK\r\ncontent-length: 1\r\n\r\n").is_err());
    }

    /// Answers each request from a list, then closes: fixed-length, chunked (split over
    /// writes), and a request left unanswered.
    #[tokio::test]
    async fn keep_alive_fixed_and_chunked_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = BytesMut::new();
            let answers: [&[&[u8]]; 2] = [
                &[b"HTTP/1.1 202 Accepted\r\ncontent-length: 5\r\n\r\nhello"],
                &[
                    b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nab",
                    b"c\r\n2;x=y\r\nde\r\n0\r\n\r\n",
                ],
            ];
            let mut requests = Vec::new();
            for answer in answers.iter().map(Some).chain([None]) {
                // One whole request: head, then its content-length body.
                let head_end = loop {
                    if let Some(i) = find(&buf, b"\r\n\r\n") {
                        break i + 4;
                    }
                    assert!(s.read_buf(&mut buf).await.expect("read") > 0);
                };
                let head = String::from_utf8(buf[..head_end].to_vec()).expect("utf8");
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("content-length");
                while buf.len() < head_end + len {
                    assert!(s.read_buf(&mut buf).await.expect("read") > 0);
                }
                requests.push(String::from_utf8(buf.split_to(head_end + len).to_vec()).expect("utf8"));
                let Some(parts) = answer else { break };
                for p in parts.iter() {
                    s.write_all(p).await.expect("write");
                    s.flush().await.expect("flush");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
            requests
        });
        let mut c = Conn::connect(addr, Some("t0k")).await.expect("connect");
        let a = c.post_json("/a", b"{\"x\":1}").await.expect("answer");
        assert_eq!(
            (a.status, a.body.as_slice(), a.close),
            (202, &b"hello"[..], false)
        );
        let a = c.post_json("/b", b"{}").await.expect("answer");
        assert_eq!((a.status, a.body.as_slice()), (404, &b"abcde"[..]));
        assert!(matches!(c.post_json("/c", b"{}").await, Err(Error::Closed)));
        let requests = server.await.expect("server");
        assert!(requests[0].starts_with("POST /a HTTP/1.1\r\n"), "{}", requests[0]);
        assert!(requests[0].contains("Authorization: Bearer t0k\r\n"));
        assert!(requests[0].ends_with("\r\n\r\n{\"x\":1}"));
        assert_eq!(requests.len(), 3);
    }
}
