"""A wasmproc worker process type in Python, against wit/wasmproc.wit's
`worker` world: it prints each message of the `jobs` queue (wasmproc logs
a guest's stdout with its instance name) and acknowledges it."""

from wit_world import exports
from wit_world.exports.handler import Delivery, Outcome, Outcome_Ok, Outcome_Reject


class Handler(exports.Handler):
    def handle(self, delivery: Delivery) -> Outcome:
        try:
            text = delivery.body.decode()
        except UnicodeDecodeError:
            return Outcome_Reject("expected a UTF-8 body")
        print(f"job {delivery.id} (attempt {delivery.attempt}) from `{delivery.queue}`: {text}")
        return Outcome_Ok()
