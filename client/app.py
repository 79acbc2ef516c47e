"""The fedtiny ClientApp: unpack a Message, call `shared/` and the client tasks, pack the reply.

Message types (the server's `server.protocol` names them):
- ``query.hello``      -> partition id and example counts (the server's node registry)
- ``query.scores``     -> local data-driven importance scores of the dense model (e.g. SNIP)
- ``query.bn``         -> BN statistics of every candidate, recalibrated on the held-out split
- ``query.candidates`` -> held-out loss of every candidate with the pooled BN statistics
- ``train``            -> masked local training; active weights back, plus top-k gradients when asked
- ``evaluate``         -> loss and accuracy of the global model on the held-out split
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import attacks, tasks
from client.runtime import client_runtime

app = ClientApp()


def _run(handler, msg: Message, context: Context) -> Message:
    runtime = client_runtime(context, msg.content)
    content = handler(runtime, msg.content, context.state)
    if runtime.partition_id in attacks.attackers(runtime.config):  # the attack drill (simulation.attack)
        masks = tasks.stored_masks(context.state, runtime.new_model())
        content = attacks.poison(runtime.config.simulation.attack, msg.metadata.message_type, msg.content, content, masks)
    return Message(content, reply_to=msg)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return _run(tasks.hello, msg, context)


@app.query("scores")
def scores(msg: Message, context: Context) -> Message:
    return _run(tasks.scores, msg, context)


@app.query("bn")
def bn(msg: Message, context: Context) -> Message:
    return _run(tasks.bn_stats, msg, context)


@app.query("candidates")
def candidates(msg: Message, context: Context) -> Message:
    return _run(tasks.evaluate_candidates, msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _run(tasks.train, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _run(tasks.evaluate, msg, context)
