//! The shop example (`examples/shop`): a 12-factor app in three process
//! types. Built three times, once per feature:
//!
//! - `web`: `POST /orders` with an order as the body enqueues it onto
//!   `orders` and answers `202 accepted ORDER-ID`; anything else gets a hint;
//! - `mailer`: a worker on `orders` that "sends" the confirmation (logs it);
//! - `report`: a clock that enqueues a summary request every 10 seconds.

#[cfg(feature = "web")]
mod web {
    use std::io::{Read as _, Write as _};

    use wasip2::http::types::{
        Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
    };

    wasip2::http::proxy::export!(Shop);
    wasmproc_guest::producer!();

    struct Shop;

    fn respond(out: ResponseOutparam, status: u16, text: &str) {
        let response = OutgoingResponse::new(Fields::new());
        let _ = response.set_status_code(status);
        let Ok(body) = response.body() else { return };
        ResponseOutparam::set(out, Ok(response));
        if let Ok(mut stream) = body.write() {
            let _ = stream.write_all(text.as_bytes());
            let _ = stream.flush();
        }
        let _ = OutgoingBody::finish(body, None);
    }

    impl wasip2::exports::http::incoming_handler::Guest for Shop {
        fn handle(request: IncomingRequest, out: ResponseOutparam) {
            let path = request.path_with_query().unwrap_or_default();
            if !(matches!(request.method(), Method::Post) && path == "/orders") {
                return respond(
                    out,
                    200,
                    "POST an order to /orders, e.g. curl -d 'two espressos' http://127.0.0.1:8080/orders\n",
                );
            }
            let mut order = Vec::new();
            if let Ok(body) = request.consume()
                && let Ok(mut stream) = body.stream()
            {
                let _ = stream.read_to_end(&mut order);
            }
            match enqueue("orders", order) {
                Ok(id) => respond(out, 202, &format!("accepted order {id}\n")),
                Err(e) => respond(out, 503, &format!("cannot take orders right now: {e:?}\n")),
            }
        }
    }
}

#[cfg(feature = "mailer")]
mod mailer {
    wasmproc_guest::worker!(Mailer);

    struct Mailer;

    impl Worker for Mailer {
        fn handle(delivery: Delivery) -> Outcome {
            let order = String::from_utf8_lossy(&delivery.body);
            if order.trim().is_empty() {
                return Outcome::Reject("empty order".into());
            }
            println!(
                "emailing the confirmation of order {}: {}",
                delivery.id,
                order.trim()
            );
            Outcome::Ok
        }
    }
}

#[cfg(feature = "report")]
mod report {
    wasmproc_guest::clock!(Report);

    struct Report;

    impl Clock for Report {
        fn on_tick(tick: Tick) -> Result<(), String> {
            println!(
                "compiling the sales report due at {} ms",
                tick.scheduled_at_ms
            );
            Ok(())
        }
    }
}
