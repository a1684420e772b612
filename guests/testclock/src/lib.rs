//! A clock that logs `tick SCHEDULE scheduled=MS` for every tick, then
//! sleeps `SLEEP_MS` milliseconds (from its formation `env`), so a test can
//! make ticks overlap. With `ENQUEUE=QUEUE` it also enqueues `ok:tick-MS`.

wasmproc_guest::clock!(TestClock);

struct TestClock;

impl Clock for TestClock {
    fn on_tick(tick: Tick) -> Result<(), String> {
        println!("tick {} scheduled={}", tick.schedule, tick.scheduled_at_ms);
        if let Ok(queue) = std::env::var("ENQUEUE") {
            enqueue(&queue, format!("ok:tick-{}", tick.scheduled_at_ms))
                .map_err(|e| format!("{e:?}"))?;
        }
        let sleep: u64 = std::env::var("SLEEP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        std::thread::sleep(std::time::Duration::from_millis(sleep));
        Ok(())
    }
}
