//! kloop-echo: a TCP echo server and a checking client on libkloop, in Rust
//! with no crates (the C functions are declared in kloop.rs).
//!
//!   kloop-echo server PORT [CONNECTIONS]
//!   kloop-echo client HOST PORT [CONNECTIONS [MESSAGES [SIZE]]]
//!
//! Both speak the same protocol as examples/c, so any client works with
//! any server. The server prints "listening on 127.0.0.1:<port>" once ready
//! and, with CONNECTIONS > 0, exits after that many connections closed. The
//! client sends MESSAGES messages of SIZE bytes on each connection, one at a
//! time, checks every echoed byte, and exits 0 only if all came back intact.

mod kloop;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::process::exit;
use std::time::{Duration, Instant};

use kloop::{Completion, Error, Loop};

const ACCEPT_TOKEN: u64 = 0;
const HIGH_WATER: u64 = 256 * 1024;
const LOW_WATER: u64 = 64 * 1024;
const DEADLINE: Duration = Duration::from_secs(60);

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: Option<T>, name: &str) -> T {
    match args.get(i) {
        Some(text) => text
            .parse()
            .unwrap_or_else(|_| usage(&format!("bad {}: {}", name, text))),
        None => default.unwrap_or_else(|| usage(&format!("missing {}", name))),
    }
}

fn usage(why: &str) -> ! {
    eprintln!("kloop-echo: {}", why);
    eprintln!("usage: kloop-echo server PORT [CONNECTIONS]");
    eprintln!("       kloop-echo client HOST PORT [CONNECTIONS [MESSAGES [SIZE]]]");
    exit(2)
}

/// Stream control calls on a stream that is already closing answer -EPIPE
/// (pause, resume) or -EALREADY (close, abort): nothing is left to do then.
fn tolerate(result: Result<(), Error>) -> Result<(), Error> {
    match result {
        Err(Error(e)) if e == -kloop::EPIPE || e == -kloop::EALREADY => Ok(()),
        other => other,
    }
}

fn server(port: u16, want: u64) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let mut lp = Loop::new()?;
    use std::os::unix::io::AsRawFd;
    lp.accept_multishot(ACCEPT_TOKEN, listener.as_raw_fd())?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;

    let mut records = [Completion::default(); 64];
    let mut next_token = 1u64;
    let mut closed = 0u64;
    let mut pauses = 0u64;
    while want == 0 || closed < want {
        let batch = match lp.poll(&mut records, -1) {
            Err(Error(e)) if e == -kloop::EINTR => continue,
            other => other?,
        };
        for c in batch {
            if c.token == ACCEPT_TOKEN {
                if c.result >= 0 {
                    // Borrow the fd as a std socket just to set TCP_NODELAY,
                    // then give it to the engine, which closes it at the end.
                    let stream = unsafe { TcpStream::from_raw_fd(c.result) };
                    stream.set_nodelay(true)?;
                    let fd = stream.into_raw_fd();
                    let token = next_token;
                    next_token += 1;
                    lp.attach(token, fd)?;
                    lp.set_limits(token, HIGH_WATER, LOW_WATER)?;
                } else if c.result != -kloop::ECANCELED {
                    eprintln!("kloop-echo: accept: {}", Error(c.result));
                }
                if c.flags & kloop::COMPLETION_MORE == 0 {
                    lp.accept_multishot(ACCEPT_TOKEN, listener.as_raw_fd())?; // it ended: re-arm
                }
                continue;
            }
            match c.event {
                kloop::EVENT_DATA => {
                    // Valid until the next poll; write() copies the bytes.
                    let data = unsafe { kloop::data_of(c) };
                    match lp.write(c.token, data) {
                        Ok(queued) if queued > HIGH_WATER => {
                            tolerate(lp.pause(c.token))?;
                            pauses += 1;
                        }
                        Ok(_) => {}
                        Err(_) => tolerate(lp.abort(c.token))?,
                    }
                }
                kloop::EVENT_WRITE_LOW => tolerate(lp.resume(c.token))?,
                kloop::EVENT_EOF => tolerate(lp.close(c.token))?,
                kloop::EVENT_ERROR => tolerate(lp.abort(c.token))?,
                kloop::EVENT_CLOSED => closed += 1,
                _ => {}
            }
        }
    }
    eprintln!(
        "kloop-echo server: {} connections served, asked to pause reading {} times",
        closed, pauses
    );
    Ok(())
}

#[derive(PartialEq)]
enum Phase {
    Echoing,
    Closing,
    Done,
}

struct Conn {
    phase: Phase,
    sent: u64,
    echoed: usize,
}

fn pattern(i: usize, m: u64, j: usize) -> u8 {
    (i.wrapping_mul(7)
        .wrapping_add((m as usize).wrapping_mul(13))
        .wrapping_add(j)) as u8
}

fn client(
    host: &str,
    port: u16,
    nconn: usize,
    messages: u64,
    size: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    if nconn == 0 || size == 0 {
        usage("CONNECTIONS and SIZE must be > 0");
    }
    let mut lp = Loop::new()?;
    let mut conns = Vec::new();
    let mut payload = vec![0u8; size];
    let fill = |payload: &mut Vec<u8>, i: usize, m: u64| {
        for (j, b) in payload.iter_mut().enumerate() {
            *b = pattern(i, m, j);
        }
    };
    // Connection i has token i + 1. Connecting is plain blocking std code;
    // from then on the engine drives the socket.
    for i in 0..nconn {
        let stream = TcpStream::connect((host, port))?;
        stream.set_nodelay(true)?;
        lp.attach(i as u64 + 1, stream.into_raw_fd())?;
        conns.push(Conn {
            phase: Phase::Echoing,
            sent: 0,
            echoed: 0,
        });
    }
    let start = Instant::now();
    for (i, c) in conns.iter_mut().enumerate() {
        if messages == 0 {
            c.phase = Phase::Closing;
            lp.shutdown(i as u64 + 1)?;
        } else {
            fill(&mut payload, i, 0);
            lp.write(i as u64 + 1, &payload)?;
            c.sent = 1;
        }
    }

    let mut records = [Completion::default(); 64];
    let mut done = 0;
    while done < nconn {
        if start.elapsed() > DEADLINE {
            return Err(format!("no end after {:?}", DEADLINE).into());
        }
        let batch = match lp.poll(&mut records, 1_000_000_000) {
            Err(Error(e)) if e == -kloop::EINTR => continue,
            other => other?,
        };
        for r in batch {
            let i = (r.token - 1) as usize;
            let c = &mut conns[i];
            match r.event {
                kloop::EVENT_DATA => {
                    let data = unsafe { kloop::data_of(r) };
                    for &byte in data {
                        if c.phase != Phase::Echoing
                            || c.echoed >= size
                            || byte != pattern(i, c.sent - 1, c.echoed)
                        {
                            return Err(format!(
                                "connection {} message {}: wrong byte at offset {}",
                                i,
                                c.sent - 1,
                                c.echoed
                            )
                            .into());
                        }
                        c.echoed += 1;
                    }
                    if c.echoed == size {
                        c.echoed = 0;
                        if c.sent == messages {
                            c.phase = Phase::Closing;
                            lp.shutdown(r.token)?; // the server sees EOF
                        } else {
                            fill(&mut payload, i, c.sent);
                            lp.write(r.token, &payload)?;
                            c.sent += 1;
                        }
                    }
                }
                kloop::EVENT_EOF => {
                    if c.phase != Phase::Closing {
                        return Err(format!(
                            "connection {} closed by the server after {} messages",
                            i, c.sent
                        )
                        .into());
                    }
                    lp.close(r.token)?;
                }
                kloop::EVENT_ERROR => {
                    return Err(format!("connection {}: {}", i, Error(r.result)).into())
                }
                kloop::EVENT_CLOSED => {
                    c.phase = Phase::Done;
                    done += 1;
                }
                _ => {}
            }
        }
    }
    println!(
        "kloop-echo client: {} connections x {} messages x {} bytes echoed intact in {:.1} ms",
        nconn,
        messages,
        size,
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (major, minor, patch) = kloop::version();
    if major != kloop::VERSION_MAJOR {
        eprintln!(
            "kloop-echo: libkloop {}.{}.{} is loaded; this program needs major version {}",
            major,
            minor,
            patch,
            kloop::VERSION_MAJOR
        );
        exit(1);
    }
    let result = match args.get(1).map(String::as_str) {
        Some("server") => server(
            arg(&args, 2, None, "PORT"),
            arg(&args, 3, Some(0), "CONNECTIONS"),
        ),
        Some("client") => client(
            &arg::<String>(&args, 2, None, "HOST"),
            arg(&args, 3, None, "PORT"),
            arg(&args, 4, Some(4), "CONNECTIONS"),
            arg(&args, 5, Some(100), "MESSAGES"),
            arg(&args, 6, Some(1024), "SIZE"),
        ),
        _ => usage("say server or client"),
    };
    if let Err(err) = result {
        eprintln!("kloop-echo: {}", err);
        exit(1);
    }
}
