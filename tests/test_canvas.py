"""Canvas through real processes: the examples of Celery's canvas guide, with embedq's import."""

import pytest

from embedq import chain, chord, group, signature, states

pytestmark = pytest.mark.timeout(60)
T = 20  # get() timeout


@pytest.fixture
def worker(app, start_worker):
    start_worker(concurrency=2)


def test_signatures_and_partials(worker):
    from testapp import add

    assert add.s(2, 2).delay().get(timeout=T) == 4
    assert add.s(2).delay(4).get(timeout=T) == 6          # partial: call args go in front
    assert signature("testapp.add", (3, 4)).apply_async().get(timeout=T) == 7
    sig = add.s(1).set(countdown=0.1)
    assert sig.options["countdown"] == 0.1 and sig.clone(args=(1,)).args == (1, 1)
    assert add.s(2, 2)() == 4                             # calling a signature runs it here


def test_link_callback_gets_the_result(worker):
    from testapp import add

    result = add.apply_async((2, 2), link=add.s(16))
    assert result.get(timeout=T) == 4
    assert result.children[0].get(timeout=T) == 20


def test_chain_and_pipe(worker):
    from testapp import add, mul

    result = chain(add.s(2, 2), add.s(4), add.s(8))()
    assert result.get(timeout=T) == 16
    assert result.parent.get(timeout=T) == 8 and result.parent.parent.get(timeout=T) == 4
    assert (add.s(2, 2) | mul.s(8) | add.s(1))().get(timeout=T) == 33
    assert (add.si(2, 2) | add.si(4, 4))().get(timeout=T) == 8   # immutable: parent ignored


def test_group(worker):
    from testapp import add

    result = group(add.s(i, i) for i in range(10))()
    assert result.get(timeout=T) == [i + i for i in range(10)]
    assert result.completed_count() == 10 and result.ready() and result.successful()
    assert len(result.results) == 10


def test_chord_three_spellings(worker):
    from testapp import add, xsum

    assert chord((add.s(i, i) for i in range(10)), xsum.s())().get(timeout=T) == 90
    assert chord(add.s(i, i) for i in range(10))(xsum.s()).get(timeout=T) == 90
    assert (group(add.s(i, i) for i in range(10)) | xsum.s())().get(timeout=T) == 90  # upgraded


def test_map_starmap_chunks(worker):
    from testapp import add, xsum

    assert xsum.map([range(10), range(100)]).delay().get(timeout=T) == [45, 4950]
    assert add.starmap(zip(range(10), range(10))).delay().get(timeout=T) == [i * 2 for i in range(10)]
    result = add.chunks(zip(range(100), range(100)), 10)()
    assert result.get(timeout=T) == [[2 * i for i in range(j, j + 10)] for j in range(0, 100, 10)]


def test_nesting(worker):
    from testapp import add, xsum

    assert group(chain(add.s(1, 1), add.s(1)), chain(add.s(2, 2), add.s(2)))().get(timeout=T) == [3, 6]
    assert (add.s(1, 1) | group(add.s(1), add.s(2)) | xsum.s())().get(timeout=T) == 7
    inner = chord([add.s(1, 1), add.s(2, 2)], xsum.s())
    assert chord([inner, add.s(3, 3)], xsum.s())().get(timeout=T) == 12
    assert chord([group(add.s(1, 1), add.s(2, 2)), add.s(3, 3)], xsum.s())().get(timeout=T) == 12
    assert chord([], xsum.s())().get(timeout=T) == 0      # empty header: body gets []


def test_failing_link_stops_the_chain(worker, tmp_path):
    from testapp import add, fail

    marks = tmp_path / "marks"
    marks.mkdir()
    result = (add.s(1, 1) | fail.si("broken") | add.s(1))()
    with pytest.raises(ValueError, match="broken"):
        result.get(timeout=T)
    assert result.state == states.FAILURE
    assert result.parent.state == states.FAILURE and result.parent.parent.get(timeout=T) == 2


def test_failing_header_fails_the_chord(worker):
    from testapp import add, fail, xsum

    result = chord([add.s(1, 1), fail.si("header"), add.s(2, 2)], xsum.s())()
    with pytest.raises(ValueError, match="header"):
        result.get(timeout=T)
    assert result.parent.failed()


def test_link_error_new_and_old_style(worker, tmp_path):
    from testapp import error_handler, fail, old_error_handler

    marks = tmp_path / "marks"
    marks.mkdir()
    failed = fail.apply_async(("nope",), link_error=error_handler.s(str(marks)))
    with pytest.raises(ValueError):
        failed.get(timeout=T)
    old = fail.apply_async(("nope",), link_error=old_error_handler.s(str(marks)))
    with pytest.raises(ValueError):
        old.get(timeout=T)
    from conftest import wait_until

    wait_until(lambda: (marks / f"errback.{failed.id}").exists() and (marks / f"old-errback.{old.id}").exists(),
               message="both errbacks")
    assert (marks / f"errback.{failed.id}").read_text().startswith("ValueError: nope")


def test_chain_link_error_runs_once_for_the_failing_task(worker, tmp_path):
    from testapp import add, error_handler, fail

    marks = tmp_path / "marks"
    marks.mkdir()
    result = (add.s(1, 1) | fail.si("mid") | add.s(1)).apply_async(link_error=error_handler.s(str(marks)))
    with pytest.raises(ValueError):
        result.get(timeout=T)
    from conftest import wait_until

    wait_until(lambda: list(marks.glob("errback.*")), message="the errback")
    assert [p.name for p in marks.glob("errback.*")] == [f"errback.{result.parent.id}"]


def test_group_result_revoke(app, tmp_path):
    from testapp import add

    result = group(add.s(1, 1), add.s(2, 2))()
    result.revoke()
    assert all(r.state == states.REVOKED for r in result.results)
    assert not result.successful() and result.ready()


def test_chord_of_ten_thousand_tasks_in_one_submit(app, start_worker):
    from testapp import add, xsum

    start_worker(concurrency=2)
    sent = []
    original = app.client.submit

    def counting_submit(messages, *args, **kwargs):
        sent.append(len(messages))
        return original(messages, *args, **kwargs)

    app.client.submit = counting_submit
    try:
        result = chord((add.s(i, i) for i in range(10_000)), xsum.s())()
    finally:
        del app.client.submit
    assert sent == [10_001]  # one SUBMIT: 10,000 members and the waiting body
    assert result.get(timeout=120) == 2 * sum(range(10_000))


def test_the_canvas_guide_example_runs(tmp_path):
    """examples/canvas.py: Celery's canvas guide with only the import changed."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run([sys.executable, os.path.join(repo, "examples", "canvas.py")],
                               capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    found = dict(line.split(" -> ", 1) for line in completed.stdout.splitlines() if " -> " in line)
    found = {key.strip(): value for key, value in found.items()}
    assert found["chain(add.s(2, 2), add.s(4), add.s(8))()"] == "16"
    assert found["chord((add.s(i, i) for i in range(10)), xsum.s())()"] == "90"
    assert found["chord inside chord"] == "12"
    assert found["chain inside group"] == "[3, 6]"
    assert "errback: task" in completed.stdout and "chord errback" in completed.stdout


def test_chain_step_that_retries_keeps_its_input_and_continues(worker, tmp_path):
    from testapp import add, add_after_retries, add_retry_new_args

    marks = tmp_path / "marks"
    marks.mkdir()
    assert (add.s(1, 1) | add_after_retries.s(10, str(marks)) | add.s(100))().get(timeout=T) == 112
    assert (add.s(1, 1) | add_retry_new_args.s(0) | add.s(100))().get(timeout=T) == 105


def test_a_fresh_handle_walks_the_workflow_from_stored_results(app, worker):
    from embedq import AsyncResult
    from testapp import add

    last = (add.s(1, 1) | add.s(2) | add.s(3))()
    assert last.get(timeout=T) == 7
    fresh = AsyncResult(last.id, app=app)          # knows nothing but the id
    middle = fresh.parent
    assert middle.id == last.parent.id and middle.get(timeout=T) == 4
    first = middle.parent
    assert first.get(timeout=T) == 2 and first.parent is None
    assert [c.id for c in AsyncResult(first.id, app=app).children] == [middle.id]
