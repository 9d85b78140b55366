"""Tests of the per-rule config that decides Snakemake reruns."""

from __future__ import annotations

import copy
import json

from maskdistill.config import validate_config
from maskdistill.plan import rule_config


def test_a_key_added_later_reruns_nothing_at_its_neutral_value():
    before = validate_config({})
    before["dataset"]["demo"].pop("background")  # a config from before the key existed
    now = validate_config({})
    assert now["dataset"]["demo"]["background"] == "plain"
    assert rule_config(now, "mining") == rule_config(before, "mining")
    clutter = copy.deepcopy(now)
    clutter["dataset"]["demo"]["background"] = "clutter"
    assert json.loads(rule_config(clutter))["dataset"]["demo"]["background"] == "clutter"
    assert now["dataset"]["demo"]["background"] == "plain"  # the config itself is left alone


def test_the_seed_rule_added_later_reruns_mining_only_when_changed():
    before = validate_config({})
    before["mining"].pop("seed_from")
    now = validate_config({})
    assert rule_config(now, "mining") == rule_config(before, "mining")
    attention = copy.deepcopy(now)
    attention["mining"]["seed_from"] = "attention"
    assert rule_config(attention, "mining") != rule_config(now, "mining")
    assert rule_config(attention, "clustering") == rule_config(now, "clustering")
