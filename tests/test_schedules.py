"""Tests for embedq.schedules: parsing, next fire times, DST, storage, catch-up.

Every clock is an explicit datetime: nothing here sleeps or reads the time.
"""

import json
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from embedq.missed_runs import DEFAULT_SKIP_TOLERANCE, due_runs
from embedq.schedules import as_schedule, crontab, schedule, schedule_from_dict

pytestmark = pytest.mark.timeout(30)

UTC = timezone.utc
NEW_YORK = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")


def utc(*args):
    return datetime(*args, tzinfo=UTC)


def fire_times(sched, start, end, anchor=None):
    """All fire times in (start, end], by chaining next_after."""
    result, moment = [], start
    while (moment := sched.next_after(moment, anchor)) <= end:
        result.append(moment)
    return result


# --- parsing -----------------------------------------------------------------

@pytest.mark.parametrize("field, spec, expected", [
    ("minute", "*", set(range(60))),
    ("minute", "*/15", {0, 15, 30, 45}),
    ("minute", "1-30/5", {1, 6, 11, 16, 21, 26}),
    ("minute", "1,5,9", {1, 5, 9}),
    ("minute", "5/15", {5, 20, 35, 50}),
    ("minute", "0-4, 30 ,59", {0, 1, 2, 3, 4, 30, 59}),
    ("minute", 7, {7}),
    ("hour", "22-2", {22, 23, 0, 1, 2}),
    ("hour", "*/6", {0, 6, 12, 18}),
    ("day_of_month", "*/10", {1, 11, 21, 31}),
    ("day_of_month", "1-7,15-21", set(range(1, 8)) | set(range(15, 22))),
    ("month_of_year", "*/3", {1, 4, 7, 10}),
    ("month_of_year", "jan", {1}),
    ("month_of_year", "Jun-Aug", {6, 7, 8}),
    ("month_of_year", "december", {12}),
    ("month_of_year", "nov-feb", {11, 12, 1, 2}),
    ("day_of_week", "mon", {1}),
    ("day_of_week", "tue-fri", {2, 3, 4, 5}),
    ("day_of_week", "sun", {0}),
    ("day_of_week", "SAT,sun", {6, 0}),
    ("day_of_week", "Monday", {1}),
    ("day_of_week", "fri-mon", {5, 6, 0, 1}),
    ("day_of_week", "mon-sun", set(range(7))),
    ("day_of_week", "*/2", {0, 2, 4, 6}),
])
def test_string_fields_expand_like_celery(field, spec, expected):
    assert getattr(crontab(**{field: spec}), field) == expected


@pytest.mark.parametrize("spec", [0, 7, "0", "7", "sun", "sunday", [7], {0, 7}])
def test_sunday_is_zero_and_seven(spec):
    assert crontab(day_of_week=spec).day_of_week == {0}
    assert crontab(day_of_week=spec) == crontab(day_of_week=0)


def test_sunday_seven_inside_ranges():
    assert crontab(day_of_week="5-7").day_of_week == {5, 6, 0}
    assert crontab(day_of_week="1-7").day_of_week == set(range(7))


def test_python_collections_are_accepted():
    entry = crontab(minute={0, 30}, hour=range(9, 18), day_of_month=[1, 15],
                    month_of_year=(3, 6), day_of_week=frozenset({1, 2}))
    assert entry.minute == {0, 30}
    assert entry.hour == set(range(9, 18))
    assert entry.day_of_month == {1, 15}
    assert entry.month_of_year == {3, 6}
    assert entry.day_of_week == {1, 2}


def test_none_means_every_value_as_in_celery():
    assert crontab(minute=None) == crontab(minute="*")


@pytest.mark.parametrize("kwargs, message", [
    ({"minute": 60}, r"minute=60: 60 is outside 0-59"),
    ({"minute": "61"}, r"minute='61'"),
    ({"minute": "1,61"}, r"minute='1,61': 61 is outside"),
    ({"minute": "*/0"}, r"minute='\*/0': step"),
    ({"minute": ""}, r"minute='': empty"),
    ({"minute": "1,,2"}, r"minute='1,,2': empty"),
    ({"minute": "1-"}, r"minute='1-': cannot parse"),
    ({"minute": "*-5"}, r"minute='\*-5': cannot parse"),
    ({"minute": "-5"}, r"minute='-5'"),
    ({"minute": "abc"}, r"minute='abc': 'abc' is not a number"),
    ({"minute": 1.5}, r"minute=1.5"),
    ({"minute": True}, r"minute=True"),
    ({"minute": [1, "2"]}, r"minute=\[1, '2'\]: '2' is not an int"),
    ({"minute": set()}, r"minute=set\(\): selects no values"),
    ({"hour": 24}, r"hour=24: 24 is outside 0-23"),
    ({"day_of_month": 0}, r"day_of_month=0: 0 is outside 1-31"),
    ({"day_of_month": "32"}, r"day_of_month='32'"),
    ({"month_of_year": 13}, r"month_of_year=13"),
    ({"month_of_year": "mon"}, r"month_of_year='mon': 'mon' is not"),
    ({"day_of_week": "funday"}, r"day_of_week='funday': 'funday' is not"),
    ({"day_of_week": 8}, r"day_of_week=8: 8 is outside 0-7"),
    ({"day_of_week": "jan"}, r"day_of_week='jan'"),
    ({"day_of_month": 31, "month_of_year": "feb"}, r"never fires"),
    ({"day_of_month": 31, "month_of_year": [2, 4, 6]}, r"never fires"),
    ({"tz": "Mars/Olympus_Mons"}, r"tz='Mars/Olympus_Mons': unknown"),
    ({"tz": 5}, r"tz=5"),
])
def test_invalid_fields_raise_value_error_naming_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        crontab(**kwargs)


def test_february_29th_is_possible():
    assert crontab(minute=0, hour=0, day_of_month=29, month_of_year=2)


def test_time_zone_forms():
    assert crontab(tz=ZoneInfo("Europe/London")).tz.key == "Europe/London"
    assert crontab(tz=timezone.utc) == crontab(tz="UTC") == crontab()


# --- from_string -------------------------------------------------------------

def test_from_string_uses_standard_cron_field_order():
    assert crontab.from_string("*/10 * * * *") == crontab(minute="*/10")
    parsed = crontab.from_string("30 2 1,15 jan-mar mon-fri", tz="Europe/London")
    assert parsed == crontab(minute=30, hour=2, day_of_month={1, 15},
                             month_of_year={1, 2, 3}, day_of_week="1-5",
                             tz="Europe/London")


@pytest.mark.parametrize("expr", ["* * * *", "* * * * * *", "", "@daily", None])
def test_from_string_needs_five_fields(expr):
    with pytest.raises(ValueError, match="expected 5 fields"):
        crontab.from_string(expr)


def test_from_string_reports_the_bad_field():
    with pytest.raises(ValueError, match="hour='25'"):
        crontab.from_string("0 25 * * *")


# --- next_after --------------------------------------------------------------

@pytest.mark.parametrize("expr, after, expected", [
    ("*/10 * * * *", utc(2024, 5, 1, 12, 3), utc(2024, 5, 1, 12, 10)),
    ("*/10 * * * *", utc(2024, 5, 1, 12, 10), utc(2024, 5, 1, 12, 20)),
    ("*/10 * * * *", utc(2024, 5, 1, 12, 9, 59, 999999), utc(2024, 5, 1, 12, 10)),
    ("0 * * * *", utc(2024, 5, 1, 23, 0), utc(2024, 5, 2, 0, 0)),
    # Friday 2024-05-03 10:00 -> Monday 09:00.
    ("0 9 * * mon-fri", utc(2024, 5, 3, 10, 0), utc(2024, 5, 6, 9, 0)),
    ("0 0 1 */3 *", utc(2024, 5, 1), utc(2024, 7, 1)),
    ("0 0 29 2 *", utc(2023, 3, 1), utc(2024, 2, 29)),
    ("59 23 31 12 *", utc(2024, 12, 31, 23, 59), utc(2025, 12, 31, 23, 59)),
])
def test_next_after(expr, after, expected):
    result = crontab.from_string(expr).next_after(after)
    assert result == expected
    assert result.tzinfo is UTC


def test_day_of_month_and_day_of_week_must_both_match():
    friday_13th = crontab(minute=0, hour=0, day_of_week="fri", day_of_month=13)
    assert friday_13th.next_after(utc(2024, 1, 1)) == utc(2024, 9, 13)
    assert friday_13th.next_after(utc(2024, 9, 13)) == utc(2024, 12, 13)
    first_monday = crontab(minute=0, hour=8, day_of_week=1, day_of_month="1-7")
    assert fire_times(first_monday, utc(2024, 1, 1), utc(2024, 4, 30)) == [
        utc(2024, 1, 1, 8), utc(2024, 2, 5, 8), utc(2024, 3, 4, 8),
        utc(2024, 4, 1, 8)]


def test_next_after_uses_the_schedule_time_zone():
    nine_in_london = crontab(minute=0, hour=9, tz="Europe/London")
    assert nine_in_london.next_after(utc(2024, 7, 1)) == utc(2024, 7, 1, 8)
    assert nine_in_london.next_after(utc(2024, 1, 1)) == utc(2024, 1, 1, 9)
    # Input in any zone; output always UTC.
    tokyo = datetime(2024, 7, 1, 18, 0, tzinfo=ZoneInfo("Asia/Tokyo"))
    assert nine_in_london.next_after(tokyo) == utc(2024, 7, 2, 8)


def test_next_after_rejects_naive_datetimes():
    with pytest.raises(ValueError, match="timezone-aware"):
        crontab().next_after(datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        schedule(5).next_after(datetime(2024, 1, 1))


# --- DST ---------------------------------------------------------------------

def test_new_york_spring_forward_daily_job_runs_once_after_gap():
    job = crontab(minute=30, hour=2, tz="America/New_York")
    # 2024-03-10 02:00 EST jumps to 03:00 EDT: 02:30 does not exist.
    assert fire_times(job, utc(2024, 3, 9), utc(2024, 3, 12)) == [
        utc(2024, 3, 9, 7, 30),    # 02:30 EST
        utc(2024, 3, 10, 7, 0),    # 03:00 EDT, first instant after the gap
        utc(2024, 3, 11, 6, 30),   # 02:30 EDT
    ]


def test_new_york_fall_back_daily_job_runs_once():
    job = crontab(minute=30, hour=1, tz="America/New_York")
    # 2024-11-03 01:00-02:00 happens twice (EDT, then EST).
    assert fire_times(job, utc(2024, 11, 2), utc(2024, 11, 5)) == [
        utc(2024, 11, 2, 5, 30),   # 01:30 EDT
        utc(2024, 11, 3, 5, 30),   # 01:30 EDT, first occurrence only
        utc(2024, 11, 4, 6, 30),   # 01:30 EST
    ]
    # Asked from inside the repeated hour, it does not fire again that day.
    second_pass = datetime(2024, 11, 3, 1, 15, fold=1, tzinfo=NEW_YORK)
    assert job.next_after(second_pass) == utc(2024, 11, 4, 6, 30)


def test_london_spring_forward_daily_job_runs_once_after_gap():
    job = crontab(minute=30, hour=1, tz="Europe/London")
    # 2024-03-31 01:00 GMT jumps to 02:00 BST.
    assert fire_times(job, utc(2024, 3, 30), utc(2024, 4, 2)) == [
        utc(2024, 3, 30, 1, 30),   # 01:30 GMT
        utc(2024, 3, 31, 1, 0),    # 02:00 BST
        utc(2024, 4, 1, 0, 30),    # 01:30 BST
    ]


def test_london_fall_back_daily_job_runs_once():
    job = crontab(minute=30, hour=1, tz="Europe/London")
    # 2024-10-27 02:00 BST goes back to 01:00 GMT.
    assert fire_times(job, utc(2024, 10, 26), utc(2024, 10, 29)) == [
        utc(2024, 10, 26, 0, 30),  # 01:30 BST
        utc(2024, 10, 27, 0, 30),  # 01:30 BST, first occurrence only
        utc(2024, 10, 28, 1, 30),  # 01:30 GMT
    ]


def test_several_slots_in_a_gap_collapse_into_one_run():
    job = crontab(minute="*/15", hour="1-2", tz="Europe/London")
    assert fire_times(job, utc(2024, 3, 31, 0, 0), utc(2024, 3, 31, 1, 50)) == [
        utc(2024, 3, 31, 1, 0),    # 01:00-01:45 GMT never happen -> 02:00 BST
        utc(2024, 3, 31, 1, 15),   # 02:15 BST
        utc(2024, 3, 31, 1, 30),
        utc(2024, 3, 31, 1, 45),
    ]


def test_frequent_jobs_follow_real_time_across_dst():
    every_half_hour = crontab(minute="*/30", tz="America/New_York")
    fall = fire_times(every_half_hour, utc(2024, 11, 3, 4), utc(2024, 11, 3, 8))
    assert fall == [utc(2024, 11, 3, 4, 30) + timedelta(minutes=30 * i)
                    for i in range(8)]   # the repeated hour runs twice
    spring = fire_times(every_half_hour, utc(2024, 3, 10, 6), utc(2024, 3, 10, 8))
    assert spring == [utc(2024, 3, 10, 6, 30), utc(2024, 3, 10, 7),
                      utc(2024, 3, 10, 7, 30), utc(2024, 3, 10, 8)]


def test_dst_behaviour_does_not_depend_on_spelling():
    star = crontab(minute="*/15", hour=2, tz="America/New_York")
    listed = crontab(minute=[0, 15, 30, 45], hour="2", tz="America/New_York")
    start, end = utc(2024, 3, 9), utc(2024, 3, 12)
    assert fire_times(star, start, end) == fire_times(listed, start, end)
    assert star == listed


def test_weekday_filter_on_a_dst_day():
    first_sunday = crontab(minute=30, hour=1, day_of_week="sun",
                           day_of_month="1-7", tz="America/New_York")
    assert fire_times(first_sunday, utc(2024, 10, 15), utc(2024, 12, 31)) == [
        utc(2024, 11, 3, 5, 30), utc(2024, 12, 1, 6, 30)]


# --- interval schedules ------------------------------------------------------

def test_interval_without_anchor_is_relative():
    assert schedule(10).next_after(utc(2024, 1, 1)) == utc(2024, 1, 1, 0, 0, 10)
    assert schedule(0.5).next_after(utc(2024, 1, 1)) == \
        utc(2024, 1, 1) + timedelta(milliseconds=500)


@pytest.mark.parametrize("after, expected", [
    (utc(2024, 1, 1, 12, 0, 25), utc(2024, 1, 1, 12, 0, 30)),
    (utc(2024, 1, 1, 12, 0, 30), utc(2024, 1, 1, 12, 0, 40)),
    (utc(2024, 1, 1, 12, 0, 29, 999999), utc(2024, 1, 1, 12, 0, 30)),
    (utc(2024, 1, 1, 11, 0), utc(2024, 1, 1, 12, 0)),   # before the anchor
    (utc(2024, 1, 8, 12, 0, 3), utc(2024, 1, 8, 12, 0, 10)),
])
def test_interval_anchoring(after, expected):
    anchor = utc(2024, 1, 1, 12)
    assert schedule(timedelta(seconds=10)).next_after(after, anchor) == expected


def test_anchored_interval_does_not_drift_after_restart():
    every_7s = schedule(7)
    anchor = datetime(2024, 1, 1, 13, 0, tzinfo=ZoneInfo("Europe/Paris"))
    before_restart = every_7s.next_after(utc(2024, 1, 1, 12, 5), anchor)
    after_restart = every_7s.next_after(utc(2024, 1, 1, 12, 9, 3, 123), anchor)
    assert (after_restart - before_restart) % timedelta(seconds=7) == timedelta(0)


def test_interval_is_real_time_across_dst():
    hourly = schedule(timedelta(hours=1))
    anchor = datetime(2024, 11, 3, 0, 0, tzinfo=NEW_YORK)
    slots = fire_times(hourly, anchor, utc(2024, 11, 3, 8), anchor)
    assert slots == [utc(2024, 11, 3, hour) for hour in range(5, 9)]


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "10",
                                 True, None, timedelta(0)])
def test_invalid_intervals(bad):
    with pytest.raises(ValueError, match="run_every"):
        schedule(bad)


# --- storage by value, repr, equality ------------------------------------------

@pytest.mark.parametrize("original", [
    crontab(),
    crontab(minute="*/15", day_of_week="mon-fri", tz="Europe/London"),
    crontab(minute={0, 1, 2, 3, 5}, hour=range(9, 18), day_of_week=[7, 6]),
    crontab.from_string("30 2 1,15 jan-mar *", tz=ZoneInfo("America/New_York")),
    schedule(10),
    schedule(timedelta(minutes=5, microseconds=1)),
    schedule(0.25),
])
def test_dict_round_trip(original):
    stored = json.dumps(original.to_dict())
    restored = schedule_from_dict(json.loads(stored))
    assert restored == original
    assert type(restored) is type(original)
    moment = utc(2024, 3, 10, 6, 59)
    assert restored.next_after(moment) == original.next_after(moment)


def test_dict_shapes():
    assert crontab(minute="*/15", day_of_week="Mon-Fri",
                   tz="Europe/London").to_dict() == {
        "type": "crontab", "minute": "*/15", "hour": "*",
        "day_of_week": "mon-fri", "day_of_month": "*", "month_of_year": "*",
        "tz": "Europe/London"}
    assert crontab(minute={0, 1, 2, 3, 5}, hour=range(24)).to_dict()["minute"] \
        == "0,1,2,3,5"
    assert crontab(hour=range(24)).to_dict()["hour"] == "*"
    assert schedule(timedelta(seconds=10)).to_dict() == \
        {"type": "interval", "seconds": 10.0}


@pytest.mark.parametrize("data, message", [
    ({"type": "solar"}, "unknown schedule type 'solar'"),
    ({"minute": "*"}, "unknown schedule type None"),
    ({"type": "crontab", "minutes": "5"},
     r"unknown crontab schedule keys \['minutes'\]"),
    ({"type": "interval"}, "without seconds"),
    ({"type": "interval", "seconds": 0}, "must be positive"),
    ({"type": "crontab", "hour": "99"}, "hour='99'"),
    ("crontab", "schedule dict expected"),
])
def test_schedule_from_dict_rejects_bad_data(data, message):
    with pytest.raises(ValueError, match=message):
        schedule_from_dict(data)


def test_repr_evaluates_back_to_an_equal_schedule():
    namespace = {"crontab": crontab, "schedule": schedule}
    for original in (crontab(minute="*/5", hour="9-17", tz="Europe/London"),
                     crontab(minute={0, 30}), schedule(2.5)):
        assert eval(repr(original), namespace) == original
    assert repr(schedule(10)) == "schedule(run_every=10.0)"


def test_equality_and_hashing():
    assert crontab(minute="*/15") == crontab(minute=[0, 15, 30, 45])
    assert hash(crontab(minute="*/15")) == hash(crontab(minute=[0, 15, 30, 45]))
    assert crontab(minute=0) != crontab(minute=0, tz="Europe/London")
    assert crontab(day_of_week="mon") != crontab(day_of_week="tue")
    assert schedule(10) == schedule(timedelta(seconds=10))
    assert hash(schedule(10)) == hash(schedule(timedelta(seconds=10)))
    assert schedule(10) != schedule(11)
    assert schedule(60) != crontab()
    assert schedule(10) != 10


# --- as_schedule -------------------------------------------------------------

def test_as_schedule():
    assert as_schedule(10) == schedule(10)
    assert as_schedule(2.5) == schedule(2.5)
    assert as_schedule(timedelta(minutes=1)) == schedule(60)
    cron, interval = crontab(minute=0), schedule(5)
    assert as_schedule(cron) is cron
    assert as_schedule(interval) is interval
    for bad in ("*/5 * * * *", None, True, {"type": "interval"}):
        with pytest.raises(TypeError, match="cannot use"):
            as_schedule(bad)


# --- missed-run policies (injected clock) --------------------------------------

T0 = utc(2024, 6, 1, 12, 0, 0)
EVERY_10S = schedule(10)


def seconds(n):
    return T0 + timedelta(seconds=n)


@pytest.mark.parametrize("policy, now, fire, next_run, last_run", [
    # Slots at +10, +20, +30 were missed; +30 is 7 s old (tolerance is 5 s).
    ("skip", 37, [], 40, 30),
    ("once", 37, [30], 40, 30),
    ("all", 37, [10, 20, 30], 40, 30),
    # +30 is only 3 s old: beat is merely late, so even "skip" runs it.
    ("skip", 33, [30], 40, 30),
    ("skip", 30, [30], 40, 30),
    # Nothing due yet.
    ("skip", 5, [], 10, 0),
    ("once", 5, [], 10, 0),
    ("all", 5, [], 10, 0),
])
def test_missed_run_policies(policy, now, fire, next_run, last_run):
    result = due_runs(EVERY_10S, T0, seconds(now), policy, anchor=T0)
    assert result.fire_times == [seconds(n) for n in fire]
    assert result.next_run == seconds(next_run)
    assert result.last_run == seconds(last_run)


def test_skip_tolerance_is_adjustable():
    late = seconds(30) + DEFAULT_SKIP_TOLERANCE + timedelta(seconds=1)
    assert due_runs(EVERY_10S, T0, late, "skip", anchor=T0).fire_times == []
    assert due_runs(EVERY_10S, T0, late, "skip", anchor=T0,
                    tolerance=timedelta(seconds=10)).fire_times == [seconds(30)]


def test_all_is_capped_and_resumes_on_the_next_call():
    first = due_runs(EVERY_10S, T0, seconds(55), "all", anchor=T0, limit=2)
    assert first.fire_times == [seconds(10), seconds(20)]
    assert first.next_run == seconds(30)       # already due: call again now
    second = due_runs(EVERY_10S, first.last_run, seconds(55), "all",
                      anchor=T0, limit=2)
    assert second.fire_times == [seconds(30), seconds(40)]
    third = due_runs(EVERY_10S, second.last_run, seconds(55), "all",
                     anchor=T0, limit=2)
    assert third.fire_times == [seconds(50)]
    assert third.next_run == seconds(60)


def test_unanchored_interval_keeps_the_last_run_grid():
    result = due_runs(schedule(10), seconds(3), seconds(28), "all")
    assert result.fire_times == [seconds(13), seconds(23)]
    assert result.next_run == seconds(33)


def test_new_entry_has_missed_nothing():
    result = due_runs(EVERY_10S, None, seconds(25), "all", anchor=T0)
    assert result.fire_times == []
    assert result.next_run == seconds(30)
    assert result.last_run == seconds(25)


def test_crontab_outage_of_three_days():
    daily = crontab(minute=0, hour=9, tz="Europe/London")
    last, now = utc(2024, 6, 1, 8), utc(2024, 6, 4, 10)   # 09:00 BST = 08:00Z
    assert due_runs(daily, last, now, "skip").fire_times == []
    assert due_runs(daily, last, now, "once").fire_times == [utc(2024, 6, 4, 8)]
    everything = due_runs(daily, last, now, "all")
    assert everything.fire_times == [utc(2024, 6, 2, 8), utc(2024, 6, 3, 8),
                                     utc(2024, 6, 4, 8)]
    assert everything.next_run == utc(2024, 6, 5, 8)
    assert everything.last_run == utc(2024, 6, 4, 8)


def test_long_outage_finds_newest_slot_without_walking_every_slot():
    every_second = schedule(1)
    now = T0 + timedelta(days=365, milliseconds=300)
    result = due_runs(every_second, T0, now, "once", anchor=T0)
    assert result.fire_times == [T0 + timedelta(days=365)]
    every_minute = crontab()
    result = due_runs(every_minute, T0, now, "once")
    assert result.fire_times == [T0 + timedelta(days=365)]
    assert result.next_run == T0 + timedelta(days=365, minutes=1)
    tiny = schedule(timedelta(microseconds=3))
    result = due_runs(tiny, T0, T0 + timedelta(days=2, microseconds=2), "once",
                      anchor=T0)
    assert result.fire_times == [T0 + timedelta(days=2)]   # 172_800e6 % 3 == 0


def test_simulated_beat_over_fall_back_runs_daily_job_once_per_day():
    job = crontab(minute=30, hour=1, tz="America/New_York")
    last_run, now, runs = utc(2024, 11, 1), utc(2024, 11, 1), []
    while now < utc(2024, 11, 6):
        result = due_runs(job, last_run, now, "all")
        runs += result.fire_times
        last_run = result.last_run
        now = result.next_run + timedelta(milliseconds=250)   # wake-up jitter
    local_days = [run.astimezone(NEW_YORK).date() for run in runs]
    assert len(runs) == len(set(local_days)) == 5
    assert utc(2024, 11, 3, 5, 30) in runs


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "sometimes"}, "policy='sometimes'"),
    ({"limit": 0}, "limit=0"),
    ({"tolerance": timedelta(seconds=-1)}, "tolerance="),
    ({"now": datetime(2024, 1, 1)}, "now must be a timezone-aware"),
    ({"last_run": datetime(2024, 1, 1)}, "last_run must be a timezone-aware"),
])
def test_due_runs_rejects_bad_arguments(kwargs, message):
    arguments = {"sched": EVERY_10S, "last_run": T0, "now": seconds(5)}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        due_runs(**arguments)


def test_due_runs_accepts_anything_as_schedule_accepts():
    assert due_runs(10, T0, seconds(25), "all").fire_times == [seconds(10),
                                                               seconds(20)]
    assert due_runs(timedelta(seconds=10), T0, seconds(25),
                    "once").fire_times == [seconds(20)]


# --- cross-check against a brute-force evaluator ---------------------------------

def brute_force_next(entry, after):
    """Slow reference: scan days, then hours and minutes (zones without DST)."""
    local = after.astimezone(entry.tz).replace(tzinfo=None)
    first = local.replace(second=0, microsecond=0) + timedelta(minutes=1)
    day = first.date()
    for _ in range(366 * 30):
        if (day.month in entry.month_of_year and day.day in entry.day_of_month
                and day.isoweekday() % 7 in entry.day_of_week):
            for hour in sorted(entry.hour):
                for minute in sorted(entry.minute):
                    candidate = datetime(day.year, day.month, day.day, hour, minute)
                    if candidate >= first:
                        return candidate.replace(tzinfo=entry.tz).astimezone(UTC)
        day += timedelta(days=1)
    raise AssertionError("no match in 30 years")


def random_spec(rng, field, low, high, names=()):
    kind = rng.choice(["*", "int", "list", "range", "step", "range-step",
                       "set", "name"])
    pick = lambda: rng.randint(low, high)  # noqa: E731
    if kind == "*":
        return "*"
    if kind == "int":
        return pick()
    if kind == "list":
        return ",".join(str(pick()) for _ in range(rng.randint(1, 4)))
    if kind == "range":
        return f"{pick()}-{pick()}"        # may wrap, as Celery allows
    if kind == "step":
        return f"*/{rng.randint(1, high)}"
    if kind == "range-step":
        return f"{pick()}-{pick()}/{rng.randint(1, 5)}"
    if kind == "set":
        return {pick() for _ in range(rng.randint(1, 5))}
    return rng.choice(names) if names else pick()


def test_next_after_matches_brute_force_for_random_expressions():
    import random
    rng = random.Random(20240601)
    days = ["sun", "mon", "tue", "wed", "thu", "fri", "sat", "sunday", "7"]
    months = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep",
              "oct", "nov", "dec", "december"]
    checked = 0
    while checked < 150:
        try:
            entry = crontab(
                minute=random_spec(rng, "minute", 0, 59),
                hour=random_spec(rng, "hour", 0, 23),
                day_of_week=random_spec(rng, "day_of_week", 0, 7, days),
                day_of_month=random_spec(rng, "day_of_month", 1, 31),
                month_of_year=random_spec(rng, "month_of_year", 1, 12, months),
                tz=rng.choice(["UTC", "Asia/Kolkata", "Asia/Tokyo"]))
        except ValueError as error:
            assert "never fires" in str(error)
            continue
        after = utc(2024, 1, 1) + timedelta(minutes=rng.randint(0, 10**6),
                                            seconds=rng.choice([0, 30]))
        assert entry.next_after(after) == brute_force_next(entry, after), entry
        checked += 1


def test_rare_day_of_month_and_weekday_combination():
    monday_29th_feb = crontab(minute=0, hour=0, day_of_month=29,
                              month_of_year=2, day_of_week="mon")
    assert monday_29th_feb.next_after(utc(2024, 1, 1)) == utc(2044, 2, 29)


def reference_next_with_dst(entry, after):
    """Slow reference for the documented DST rule (dense schedules only).

    Time-of-day schedules: each wall-clock slot maps to its first occurrence,
    or to the first real minute after a gap.  Others: scan real minutes.
    """
    tz, after = entry.tz, after.astimezone(UTC)

    def day_matches(day):
        return (day.month in entry.month_of_year and day.day in entry.day_of_month
                and day.isoweekday() % 7 in entry.day_of_week)

    def first_real_instant(naive):
        while naive.replace(tzinfo=tz).astimezone(UTC).astimezone(tz) \
                .replace(tzinfo=None) != naive:
            naive += timedelta(minutes=1)
        return naive.replace(tzinfo=tz, fold=0).astimezone(UTC)

    if len(entry.minute) < 60 and len(entry.hour) < 24:
        day = after.astimezone(tz).date() - timedelta(days=1)
        slots = [first_real_instant(datetime(d.year, d.month, d.day, h, m))
                 for d in (day + timedelta(days=i) for i in range(9))
                 if day_matches(d) for h in entry.hour for m in entry.minute]
        return min((slot for slot in slots if slot > after), default=None)
    moment = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(60 * 24 * 4):
        local = moment.astimezone(tz)
        if (day_matches(local.date()) and local.hour in entry.hour
                and local.minute in entry.minute):
            return moment
        moment += timedelta(minutes=1)
    return None


def test_next_after_matches_dst_reference_around_transitions():
    import random
    rng = random.Random(7)
    transitions = [utc(2024, 3, 10, 7), utc(2024, 11, 3, 6),     # New York
                   utc(2024, 3, 31, 1), utc(2024, 10, 27, 1)]    # London
    checked = 0
    while checked < 300:
        entry = crontab(
            minute=rng.choice(["*", "0", "30", "*/15", "0,30", "45-59/7", {5, 59}]),
            hour=rng.choice(["*", "0-4", "1", "2", "1,2", "0-3/2", "22-3"]),
            day_of_week=rng.choice(["*", "*", "sun", "sat-mon"]),
            tz=rng.choice(["America/New_York", "Europe/London"]))
        after = rng.choice(transitions) + timedelta(
            minutes=rng.randint(-300, 300), seconds=rng.choice([0, 17]))
        if rng.random() < 0.3:   # local input, possibly in the repeated hour
            after = after.astimezone(entry.tz).replace(fold=rng.choice([0, 1]))
        expected = reference_next_with_dst(entry, after)
        if expected is not None:
            assert entry.next_after(after) == expected, (entry, after)
            checked += 1
