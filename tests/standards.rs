//! End-to-end tests of the standard interfaces components built for other
//! hosts use: `wasi:config` and `wasi:keyvalue`, with the test guests
//! `testkv` (web) and `kvworker` (worker), which know nothing of wasmproc.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::{Host, RedisServer};

/// `GET path` on `host`; the body, trimmed.
fn get(host: &Host, path: &str) -> String {
    let reply = host.get(path);
    assert_eq!(reply.status, 200, "{path}: {reply:?}");
    reply.body.trim_end().to_string()
}

/// A web type `kv` (testkv) granted `buckets`, with `extra` lines, and
/// formation-level `tables`.
fn kv_formation(tables: &str, buckets: &str, extra: &str) -> String {
    format!(
        "{tables}\n[http]\nlisten = \"127.0.0.1:0\"\n\n[process.kv]\nkind = \"web\"\ncomponent = \"{{testkv}}\"\nkeyvalue = [{buckets}]\n{extra}\n"
    )
}

#[test]
fn a_guest_reads_its_own_config_and_no_other_types() {
    let host = Host::start_with(
        "[http]\nlisten = \"127.0.0.1:0\"\n\n[process.kv]\nkind = \"web\"\ncomponent = \"{testkv}\"\nroutes = [\"/\"]\nconfig = { greeting = \"hello\", region = \"${REGION:-eu}\", secret = \"${SECRET}\" }\n\n[process.other]\nkind = \"web\"\ncomponent = \"{testkv}\"\nroutes = [\"other.example/\"]\n",
        &common::shared_cache(),
        &[("SECRET", "s3cret")],
    );
    assert_eq!(get(&host, "/config?key=greeting"), "hello");
    assert_eq!(get(&host, "/config?key=region"), "eu");
    assert_eq!(get(&host, "/config?key=secret"), "s3cret");
    assert_eq!(get(&host, "/config?key=missing"), "unset");
    // The other type has no config at all.
    let other = host.request("GET", "/config?key=greeting", Some("other.example"), None);
    assert_eq!(other.body.trim_end(), "unset");
}

#[test]
fn buckets_keep_values_and_only_granted_ones_open() {
    let host = Host::start(&kv_formation("", "\"cart\"", ""));
    assert_eq!(get(&host, "/set?bucket=cart&key=apples&value=3"), "ok");
    assert_eq!(get(&host, "/set?bucket=cart&key=pears&value=2"), "ok");
    assert_eq!(get(&host, "/get?bucket=cart&key=apples"), "3");
    assert_eq!(get(&host, "/get?bucket=cart&key=plums"), "none");
    assert_eq!(get(&host, "/list?bucket=cart"), "apples\npears");
    assert_eq!(get(&host, "/incr?bucket=cart&key=visits&by=5"), "5");
    assert_eq!(get(&host, "/incr?bucket=cart&key=visits&by=1"), "6");
    assert_eq!(get(&host, "/get?bucket=cart&key=visits"), "6");
    assert_eq!(get(&host, "/delete?bucket=cart&key=pears"), "ok");
    assert_eq!(get(&host, "/get?bucket=cart&key=pears"), "none");
    // A bucket the type is not granted.
    assert_eq!(
        get(&host, "/open?bucket=secrets"),
        "error: Error::AccessDenied"
    );
    let mut host = host;
    host.wait_for_log("bucket `secrets` denied");
}

#[test]
fn values_and_buckets_are_bounded() {
    let host = Host::start(&kv_formation(
        "[keyvalue]\nmax_value = \"1KiB\"\nmax_bucket_bytes = \"3KiB\"",
        "\"small\"",
        "",
    ));
    let too_big = get(&host, "/big?bucket=small&key=a&bytes=2000");
    assert!(
        too_big.contains("the value is 2000 bytes: expected at most 1024"),
        "{too_big}"
    );
    for key in ["a", "b", "c"] {
        assert_eq!(
            get(&host, &format!("/big?bucket=small&key={key}&bytes=1000")),
            "ok"
        );
    }
    let full = get(&host, "/big?bucket=small&key=d&bytes=1000");
    assert!(full.contains("bucket `small` would hold"), "{full}");
    // Overwriting within the bound still works; nothing of `d` was written.
    assert_eq!(get(&host, "/big?bucket=small&key=a&bytes=10"), "ok");
    assert_eq!(get(&host, "/get?bucket=small&key=d"), "none");
}

#[test]
fn a_value_survives_kill_9_once_its_write_returned() {
    let mut host = Host::start(&kv_formation("", "\"durable\"", ""));
    assert_eq!(get(&host, "/set?bucket=durable&key=k&value=kept"), "ok");
    assert_eq!(get(&host, "/incr?bucket=durable&key=n&by=41"), "41");
    host.kill9();
    let formation = host.dir().join("formation.toml");
    let again = Host::restart_in(host.into_dir(), &formation);
    assert_eq!(get(&again, "/get?bucket=durable&key=k"), "kept");
    assert_eq!(get(&again, "/incr?bucket=durable&key=n&by=1"), "42");
}

#[test]
fn a_web_type_and_a_worker_share_a_bucket() {
    let mut host = Host::start(&format!(
        "{}\n[process.counter]\nkind = \"worker\"\ncomponent = \"{{kvworker}}\"\nqueue = \"counts\"\nkeyvalue = [\"shared\"]\n",
        kv_formation("", "\"shared\"", "")
    ));
    assert_eq!(get(&host, "/incr?bucket=shared&key=hits&by=10"), "10");
    for _ in 0..5 {
        assert_eq!(host.enqueue("counts", "incr:shared:hits").status, 202);
    }
    host.wait_until("the worker counted five", |log| {
        log.iter().any(|l| l.contains("counted 15"))
    });
    assert_eq!(get(&host, "/get?bucket=shared&key=hits"), "15");
    host.wait_for_log("instance=counter.");
}

#[test]
fn two_hosts_on_one_redis_increment_one_counter_exactly() {
    let redis = RedisServer::start();
    let tables = format!("[queue]\nbackend = \"redis\"\nurl = \"{}\"", redis.url);
    let formation = kv_formation(&tables, "\"hits\"", "scale = 4");
    let hosts = [Host::start(&formation), Host::start(&formation)];
    let threads: Vec<_> = hosts
        .iter()
        .flat_map(|host| {
            (0..4).map(|_| {
                let addr = host.addr.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        let reply = common::request(
                            &addr,
                            "GET",
                            "/incr?bucket=hits&key=n&by=1",
                            None,
                            None,
                        );
                        assert_eq!(reply.status, 200, "{reply:?}");
                    }
                })
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    // 2 hosts × 4 clients × 25 increments, none lost or doubled.
    assert_eq!(get(&hosts[0], "/get?bucket=hits&key=n"), "200");
    assert_eq!(get(&hosts[1], "/get?bucket=hits&key=n"), "200");
}

#[test]
fn operators_read_and_write_buckets_with_the_cli() {
    let host = Host::start(&kv_formation("", "\"cart\"", ""));
    let (code, _, stderr) = host.cli(&["kv", "set", "cart", "my key", "v1"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = host.cli(&["kv", "get", "cart", "my key"]);
    assert_eq!((code, stdout.as_str()), (0, "v1"), "{stderr}");
    assert_eq!(get(&host, "/set?bucket=cart&key=other&value=2"), "ok");
    let (code, stdout, _) = host.cli(&["kv", "list", "cart"]);
    assert_eq!((code, stdout.as_str()), (0, "my key\nother\n"));
    let (code, _, _) = host.cli(&["kv", "delete", "cart", "other"]);
    assert_eq!(code, 0);
    let (code, _, stderr) = host.cli(&["kv", "get", "cart", "other"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no key `other` in `cart`"), "{stderr}");
    let (code, _, stderr) = host.cli(&["kv", "get", "nope", "k"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown bucket `nope`"), "{stderr}");
}
