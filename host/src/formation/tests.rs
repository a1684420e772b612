use super::*;

fn parse(text: &str) -> Result<Formation, FormationErrors> {
    Formation::parse(Path::new("/srv/app/formation.toml"), text, |name| {
        (name == "PORT").then(|| "9090".to_string())
    })
}

#[test]
fn a_minimal_formation_gets_the_documented_defaults() {
    let f = parse("[process.web]\nkind = \"web\"\ncomponent = \"web.wasm\"\n").unwrap();
    assert_eq!(f.http.listen, "0.0.0.0:9090".parse().unwrap());
    assert_eq!(f.http.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
    let web = &f.processes[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.component, Path::new("/srv/app/web.wasm"));
    assert_eq!(
        web.role,
        Role::Web(WebRole {
            routes: vec![Route::parse("/").unwrap()],
            backlog: DEFAULT_BACKLOG,
            concurrency: DEFAULT_CONCURRENCY,
        })
    );
    assert_eq!((web.scale, web.reuse), (DEFAULT_SCALE, DEFAULT_REUSE));
    assert_eq!(web.limits.memory, DEFAULT_MEMORY);
    assert_eq!(web.limits.timeout, DEFAULT_TIMEOUT);
    assert_eq!(web.limits.fuel, None);
}

#[test]
fn listen_expands_port_with_a_default() {
    let f = Formation::parse(
        Path::new("f.toml"),
        "[http]\nlisten = \"127.0.0.1:${PORT:-8080}\"\n[process.web]\nkind = \"web\"\ncomponent = \"w.wasm\"\n",
        |_| None,
    )
    .unwrap();
    assert_eq!(f.http.listen, "127.0.0.1:8080".parse().unwrap());
}

#[test]
fn routes_parse_hosts_and_prefixes() {
    assert_eq!(
        Route::parse("API.example.com/v1/").unwrap(),
        Route {
            host: Some("api.example.com".into()),
            prefix: "/v1".into()
        }
    );
    assert_eq!(Route::parse("/").unwrap().prefix, "/");
    assert!(Route::parse("nopath").is_err());
    assert!(Route::parse("host:80/").is_err());
}

#[test]
fn every_problem_is_reported_at_once() {
    let errors = parse(
        "[process.web]\nkind = \"web\"\ncomponent = \"a.wasm\"\nscale = 0\n\n[process.Bad]\nkind = \"web\"\ncomponent = \"b.wasm\"\n",
    )
    .unwrap_err();
    let messages: Vec<_> = errors.errors().iter().map(|e| e.message.as_str()).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    // In file order.
    assert!(messages[0].contains("`scale` is 0"), "{messages:?}");
    assert!(
        messages[1].contains("invalid process type name `Bad`"),
        "{messages:?}"
    );
}

#[test]
fn errors_print_file_line_column_and_a_caret() {
    let errors =
        parse("[process.web]\nkind = \"web\"\ncomponent = \"a.wasm\"\nscale = 0\n").unwrap_err();
    let text = errors.to_string();
    assert!(
        text.starts_with("error: /srv/app/formation.toml:4:9: `scale` is 0"),
        "{text}"
    );
    assert!(text.contains("4 | scale = 0\n  |         ^\n"), "{text}");
}

#[test]
fn limits_cpu_is_cores_in_thousandths() {
    let cpu = |value: &str| {
        let text = format!(
            "[process.web]\nkind = \"web\"\ncomponent = \"w.wasm\"\nlimits = {{ cpu = {value} }}\n"
        );
        parse(&text).map(|f| f.processes[0].limits.cpu_millicores)
    };
    assert_eq!(cpu("0.5").unwrap(), Some(500));
    assert_eq!(cpu("2").unwrap(), Some(2000));
    assert_eq!(cpu("0.01").unwrap(), Some(10));
    let error = cpu("0.001").unwrap_err().to_string();
    assert!(
        error.contains("`limits.cpu` is 0.001: expected a number of cores from 0.01 to 1024"),
        "{error}"
    );
    let plain = parse("[process.web]\nkind = \"web\"\ncomponent = \"w.wasm\"\n").unwrap();
    assert_eq!(plain.processes[0].limits.cpu_millicores, None);
}
