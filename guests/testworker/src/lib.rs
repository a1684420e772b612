//! A worker whose behaviour is chosen by the message body, `VERB:TAG[:N]`:
//!
//! | body                 | what the worker does                                    |
//! |----------------------|---------------------------------------------------------|
//! | `ok:T`               | logs `processed T attempt=A`, returns `ok`              |
//! | `retry:T:N`          | returns `retry(100ms)` until attempt N, then as `ok:T`  |
//! | `reject:T`           | returns `reject("bad message T")`                       |
//! | `trap-once:T`        | traps on attempt 1, then as `ok:T`                      |
//! | `trap:T`             | always traps                                            |
//! | `sleep:T:MS`         | sleeps MS milliseconds, then as `ok:T`                  |
//! | `noop`               | returns `ok` and logs nothing (for benchmarks)          |

wasmproc_guest::worker!(TestWorker);

struct TestWorker;

fn processed(tag: &str, delivery: &Delivery) -> Outcome {
    println!(
        "processed {tag} attempt={} id={} queue={}",
        delivery.attempt, delivery.id, delivery.queue
    );
    Outcome::Ok
}

impl Worker for TestWorker {
    fn handle(delivery: Delivery) -> Outcome {
        let body = String::from_utf8_lossy(&delivery.body).to_string();
        let mut parts = body.splitn(3, ':');
        let verb = parts.next().unwrap_or_default();
        let tag = parts.next().unwrap_or_default();
        let n: u64 = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        match verb {
            "noop" => Outcome::Ok,
            "ok" => processed(tag, &delivery),
            "retry" if u64::from(delivery.attempt) < n => Outcome::Retry(Some(100)),
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
