"""Settings: attribute and mapping access to one dict of values, validated on the way in."""

import pickle

import pytest

from embedq.config import DEFAULTS, Settings

pytestmark = pytest.mark.timeout(30)


def test_attribute_and_item_access_are_one_store():
    conf = Settings(task_default_queue="q1")
    assert conf.task_default_queue == conf["task_default_queue"] == conf.get("task_default_queue") == "q1"
    conf.task_default_queue = "q2"
    assert conf["task_default_queue"] == "q2"
    conf["my_setting"] = 1
    assert conf.my_setting == 1 and conf.unused() == ["my_setting"]
    assert conf.as_dict() == {**DEFAULTS, "task_default_queue": "q2", "my_setting": 1}
    assert Settings().beat_schedule is not conf.beat_schedule  # mutable defaults are copied


def test_unknown_names_and_bad_values_fail_clearly():
    conf = Settings()
    with pytest.raises(AttributeError, match="no setting named 'nope'"):
        conf.nope
    assert conf.get("nope", 5) == 5
    with pytest.raises(ValueError, match="broker_durability must be one of"):
        conf.broker_durability = "maybe"
    for name in ("get", "update", "as_dict", "_values"):  # would hide Settings' own methods
        with pytest.raises(ValueError, match="cannot be a setting name"):
            conf[name] = 1
    assert conf.get("result_expires") == DEFAULTS["result_expires"]


def test_settings_survive_pickling():
    conf = Settings(broker_url="tcp://127.0.0.1:5555", my_setting=[1])
    copy = pickle.loads(pickle.dumps(conf))
    assert copy.as_dict() == conf.as_dict() and copy.broker_url == "tcp://127.0.0.1:5555"
