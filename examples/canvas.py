"""The examples of Celery's canvas guide ("Canvas: Designing Work-flows"), run against embedq.

Only the import differs from Celery's guide (``from embedq import ...`` instead of
``from celery import ...``); the app is started in-process by ``embedq.start``.

    python examples/canvas.py
"""

import tempfile

import embedq
from embedq import chain, chord, group, signature

app = embedq.App("canvas")


@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def xsum(numbers):
    return sum(numbers)


@app.task
def log_error(request, exc, traceback):
    print(f"    errback: task {request.id} raised {exc!r}")


@app.task
def on_chord_error(request, exc, traceback):
    print(f"    chord errback: {exc!r}")


@app.task
def fail():
    raise ValueError("this task always fails")


def show(label, value):
    print(f"{label:<58} -> {value}")


def main():
    # Signatures and partials
    show("add.s(2, 2).delay().get()", add.s(2, 2).delay().get(timeout=10))
    show("signature('canvas.add', args=(2, 2), countdown=1)", signature("canvas.add", args=(2, 2), countdown=1).delay().get(timeout=10))
    partial = add.s(2)
    show("partial = add.s(2); partial.delay(4).get()", partial.delay(4).get(timeout=10))
    show("add.s(2, 2)()  (runs here, like a function)", add.s(2, 2)())

    # Callbacks
    result = add.apply_async((2, 2), link=add.s(8))
    show("add.apply_async((2, 2), link=add.s(8)): parent, child", (result.get(timeout=10), result.children[0].get(timeout=10)))
    show("immutable callback: link=mul.si(2, 3)", add.apply_async((2, 2), link=mul.si(2, 3)).children[0].get(timeout=10))
    failed = fail.apply_async(link_error=log_error.s())
    try:
        failed.get(timeout=10)
    except ValueError as exc:
        show("fail.apply_async(link_error=log_error.s())", repr(exc))

    # Chains
    result = chain(add.s(2, 2), add.s(4), add.s(8))()
    show("chain(add.s(2, 2), add.s(4), add.s(8))()", result.get(timeout=10))
    show("  .parent.get(), .parent.parent.get()", (result.parent.get(timeout=10), result.parent.parent.get(timeout=10)))
    show("(add.s(2, 2) | add.s(4) | add.s(8))().get()", (add.s(2, 2) | add.s(4) | add.s(8))().get(timeout=10))
    show("(add.si(2, 2) | add.si(4, 4))()  (immutable)", (add.si(2, 2) | add.si(4, 4))().get(timeout=10))
    show("(add.s(4, 4) | mul.s(8))().get()", (add.s(4, 4) | mul.s(8))().get(timeout=10))

    # Groups
    result = group(add.s(i, i) for i in range(10))()
    show("group(add.s(i, i) for i in range(10))().get()", result.get(timeout=10))
    show("  .ready(), .successful(), .completed_count()", (result.ready(), result.successful(), result.completed_count()))
    show("group(add.s(2), add.s(4))(10)  (partial)", group(add.s(2), add.s(4))(10).get(timeout=10))

    # Chords
    show("chord((add.s(i, i) for i in range(10)), xsum.s())()", chord((add.s(i, i) for i in range(10)), xsum.s())().get(timeout=10))
    show("chord(add.s(i, i) for i in range(10))(xsum.s())", chord(add.s(i, i) for i in range(10))(xsum.s()).get(timeout=10))
    show("(group(add.s(i, i) for i in range(10)) | xsum.s())()", (group(add.s(i, i) for i in range(10)) | xsum.s())().get(timeout=10))
    result = chord([add.s(1, 1), fail.si()], xsum.s()).apply_async(link_error=on_chord_error.s())
    try:
        result.get(timeout=10)
    except ValueError as exc:
        show("chord with a failing header task", repr(exc))

    # Map, starmap, chunks
    show("xsum.map([range(10), range(100)])", xsum.map([range(10), range(100)]).delay().get(timeout=10))
    show("add.starmap(zip(range(10), range(10)))", add.starmap(zip(range(10), range(10))).delay().get(timeout=10))
    show("add.chunks(zip(range(100), range(100)), 10)()", add.chunks(zip(range(100), range(100)), 10)().get(timeout=10)[:2] + ["..."])
    show("len(add.chunks(..., 10).group())", len(add.chunks(zip(range(100), range(100)), 10).group()))

    # Nesting
    show("(add.s(4, 4) | group(add.si(2, 2), add.si(4, 4)))()", (add.s(4, 4) | group(add.si(2, 2), add.si(4, 4)))().get(timeout=10))
    show("chain inside group", group(add.s(1, 1) | add.s(1), add.s(2, 2) | add.s(2))().get(timeout=10))
    inner = chord([add.s(1, 1), add.s(2, 2)], xsum.s())
    show("chord inside chord", chord([inner, add.s(3, 3)], xsum.s())().get(timeout=10))


if __name__ == "__main__":  # the worker processes import this file; the guard keeps them idle
    with tempfile.TemporaryDirectory() as data_dir, embedq.start(app, workers=2, data_dir=data_dir):
        main()
