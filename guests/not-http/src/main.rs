//! A plain WASI command. wasmproc must refuse it for `kind = "web"` because it
//! does not export `wasi:http/incoming-handler`.

fn main() {
    println!("I am a command, not an HTTP handler");
}
