"""Queues and routing: task_routes (exact, glob, regex, function), per-call and per-task queues,
workers consuming a subset with -Q."""

import re

import pytest

from embedq import states
from embedq.routing import Router

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def routes(app):
    yield app.conf
    app.conf.task_routes = None


def test_task_queue_attribute_and_worker_queue_subset(app, start_worker):
    import testapp

    start_worker(queues=["celery"])
    special = testapp.special.delay()
    assert testapp.add.delay(1, 1).get(timeout=20) == 2
    assert special.state == states.PENDING  # nobody consumes "special" yet
    start_worker(queues=["special", "other"])
    assert special.get(timeout=20) == "special"


def test_task_routes_dict_with_globs_and_call_override(app, start_worker, routes):
    import testapp

    routes.task_routes = {"testapp.where": {"queue": "exact"}, "testapp.wh*": "glob"}
    start_worker(queues=["exact", "glob", "call"])
    assert testapp.where.delay().get(timeout=20) == "exact"
    assert testapp.where.apply_async(queue="call").get(timeout=20) == "call"
    routes.task_routes = {"testapp.wh*": "glob"}
    assert testapp.where.delay().get(timeout=20) == "glob"


def test_router_function(app, start_worker, routes):
    import testapp

    def router(name, args, kwargs, options, task=None, **kw):
        return {"queue": "fn"} if name == "testapp.where" else None

    routes.task_routes = [router]
    start_worker(queues=["fn"])
    assert testapp.where.delay().get(timeout=20) == "fn"


def test_router_unit():
    def fn(name, args, kwargs, options, task=None, **kw):
        return "from-fn" if name.startswith("fn.") else None

    router = Router([{"a.exact": {"queue": "x", "priority": 7}, "b.*": "bees",
                      re.compile(r"^c\.\d+$"): {"queue": "regex"}}, fn])
    assert router.route("a.exact", (), {}, {}) == {"queue": "x", "priority": 7}
    assert router.route("b.thing", (), {}, {}) == {"queue": "bees"}
    assert router.route("c.12", (), {}, {}) == {"queue": "regex"}
    assert router.route("fn.go", (), {}, {}) == {"queue": "from-fn"}
    assert router.route("nothing", (), {}, {}) == {}
    with pytest.raises(TypeError):
        Router([42])


def test_delay_header_cache_follows_every_setting_it_is_made_of():
    """delay() reuses its header's JSON; each setting it is made of must still take effect."""
    import testapp
    from embedq import protocol as P

    task, conf = testapp.where, testapp.app.conf

    def header():
        _, raw, _ = task._plain_message((), {}, None)
        plain = P.decode(raw)
        _, built, _ = task.build_message((), {}, task_id=plain["id"])
        assert raw == built  # the cached path writes exactly what build_message writes
        return plain

    assert header()["queue"] == "celery"
    first, second = header()["id"], header()["id"]
    assert first != second  # one header template, a fresh id per call
    changes = [("queue", lambda: setattr(task, "queue", "q-attr"), lambda h: h["queue"] == "q-attr"),
               ("priority", lambda: setattr(task, "priority", 7), lambda h: h["priority"] == 7),
               ("time_limit", lambda: setattr(task, "time_limit", 3), lambda h: h["time_limit"] == 3),
               ("ignore_result", lambda: setattr(task, "ignore_result", True), lambda h: h["notify"] is False)]
    try:
        for name, change, check in changes:
            change()
            assert check(header()), name
        del task.queue
        conf.task_routes = {"testapp.where": "q-route"}
        assert header()["queue"] == "q-route"
        conf.task_routes = [lambda name, args, kwargs, options, task=None: f"q-{len(args)}"]
        _, raw, _ = task._plain_message((1, 2), {}, None)
        assert P.decode(raw)["queue"] == "q-2"  # a router function sees every call's arguments
        conf.task_routes = None
        conf.task_default_queue = "q-default"
        assert header()["queue"] == "q-default"
    finally:
        for name in ("queue", "priority", "time_limit", "ignore_result"):
            task.__dict__.pop(name, None)
        conf.task_routes = None
        conf.task_default_queue = "celery"
    assert header()["queue"] == "celery"
