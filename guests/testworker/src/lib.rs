//! A worker whose behaviour is chosen by the message body, `VERB:TAG[:N]`:
//!
//! | body                 | what the worker does                                    |
//! |----------------------|---------------------------------------------------------|
//! | `ok:T`               | logs `processed T attempt=A`, returns `ok`              |
//! | `retry:T:N[:MS]`     | logs `retrying T attempt=A at=NOW`, returns `retry(MS)` (default 100) until attempt N, then as `ok:T` |
//! | `reject:T`           | returns `reject("bad message T")`                       |
//! | `trap-once:T`        | traps on attempt 1, then as `ok:T`                      |
//! | `trap:T`             | always traps                                            |
//! | `sleep:T:MS`         | sleeps MS milliseconds, then as `ok:T`                  |
//! | `noop`               | returns `ok` and logs nothing (for benchmarks)          |

wasmproc_guest::worker!(TestWorker);

struct TestWorker;

/// Milliseconds since the Unix epoch, by the host's wall clock.
fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn processed(tag: &str, delivery: &Delivery) -> Outcome {
    println!(
        "processed {tag} attempt={} id={} queue={} at={}",
        delivery.attempt,
        delivery.id,
        delivery.queue,
        now_ms()
    );
    Outcome::Ok
}

impl Worker for TestWorker {
    fn handle(delivery: Delivery) -> Outcome {
        let body = String::from_utf8_lossy(&delivery.body).to_string();
        let mut parts = body.splitn(4, ':');
        let verb = parts.next().unwrap_or_default();
        let tag = parts.next().unwrap_or_default();
        let n: u64 = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let ms: Option<u64> = parts.next().and_then(|ms| ms.parse().ok());
        match verb {
            "noop" => Outcome::Ok,
            "ok" => processed(tag, &delivery),
            "retry" if u64::from(delivery.attempt) < n => {
                println!(
                    "retrying {tag} attempt={} at={}",
                    delivery.attempt,
                    now_ms()
                );
                Outcome::Retry(Some(ms.unwrap_or(100)))
            }
            "retry" => processed(tag, &delivery),
            "reject" => Outcome::Reject(format!("bad message {tag}")),
            "trap-once" if delivery.attempt == 1 => panic!("trap-once {tag}"),
            "trap-once" => processed(tag, &delivery),
            "trap" => panic!("trap {tag}"),
            "sleep" => {
                println!("sleeping {tag}");
                std::thread::sleep(std::time::Duration::from_millis(n));
                processed(tag, &delivery)
            }
            _ => Outcome::Reject(format!("unknown verb `{verb}`")),
        }
    }
}
