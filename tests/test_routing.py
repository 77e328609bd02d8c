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
