"""The pure parts of `tproxy run --user`: capability masks, resolving the user, what to do when.

The drop itself (setuid, capset, the bounding set) needs root and is checked end to end in
tests/integration/test_least_privilege.py, in /proc/PID/status of every process.
"""

from __future__ import annotations

import os
import pwd

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.service.privileges import (
    CAP_NET_ADMIN,
    CAP_NET_BIND_SERVICE,
    KEPT,
    ROOT_NOTICE,
    PrivilegeError,
    RunAs,
    StartPlan,
    bounding_drops,
    capabilities_of,
    capability_mask,
    has_capability,
    parse_status_capabilities,
    plan_start,
    resolve_user,
    split_mask,
)

NOBODY = RunAs("nobody", 65534, 65534)

STATUS = """Name:\tpython3
Uid:\t65534\t65534\t65534\t65534
CapInh:\t0000000000000000
CapPrm:\t0000000000001000
CapEff:\t0000000000001000
CapBnd:\t0000000000001000
CapAmb:\t0000000000000000
NoNewPrivs:\t0
"""


def test_net_admin_is_bit_12() -> None:
    assert capability_mask(KEPT) == 0x1000
    assert capability_mask([CAP_NET_ADMIN, CAP_NET_BIND_SERVICE]) == 0x1400
    assert capability_mask([]) == 0


def test_capabilities_above_31_go_in_the_high_half() -> None:
    assert split_mask(capability_mask([12, 40])) == (0x1000, 1 << 8)
    assert split_mask(0x1FFFFFFFFFF) == (0xFFFFFFFF, 0x1FF)


def test_a_capability_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        capability_mask([64])
    with pytest.raises(ValueError):
        capability_mask([-1])


@given(st.frozensets(st.integers(0, 63)))
def test_mask_and_capabilities_are_inverse(caps: frozenset[int]) -> None:
    mask = capability_mask(caps)
    assert capabilities_of(mask) == caps
    low, high = split_mask(mask)
    assert low | high << 32 == mask


def test_status_capabilities() -> None:
    caps = parse_status_capabilities(STATUS)
    assert caps == {"CapInh": 0, "CapPrm": 0x1000, "CapEff": 0x1000, "CapBnd": 0x1000,
                    "CapAmb": 0}  # fmt: skip
    assert has_capability(CAP_NET_ADMIN, STATUS)
    assert not has_capability(CAP_NET_BIND_SERVICE, STATUS)


def test_bounding_drops_all_but_the_kept() -> None:
    drops = bounding_drops(40, KEPT)
    assert CAP_NET_ADMIN not in drops
    assert drops == [c for c in range(41) if c != 12]


def test_resolve_a_user_by_name_and_by_number() -> None:
    me = pwd.getpwuid(os.getuid())
    by_name = resolve_user(me.pw_name)
    assert by_name == RunAs(me.pw_name, me.pw_uid, me.pw_gid)
    assert resolve_user(str(me.pw_uid)) == by_name


def test_a_missing_user_is_one_sentence() -> None:
    with pytest.raises(PrivilegeError) as caught:
        resolve_user("tproxy-no-such-user")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--user tproxy-no-such-user: no such user (create it with 'useradd")


def test_root_with_user_drops_after_binding() -> None:
    assert plan_start(0, NOBODY) == StartPlan(drop=True)


def test_root_without_user_gets_the_notice() -> None:
    assert plan_start(0, None) == StartPlan(drop=False, notice=ROOT_NOTICE)
    assert "--user NAME" in ROOT_NOTICE and "Least privilege" in ROOT_NOTICE


def test_a_user_without_user_runs_as_it_is() -> None:
    assert plan_start(65534, None) == StartPlan(drop=False)


def test_already_the_user_has_nothing_to_drop() -> None:
    """systemd's `User=nobody` with `--user nobody` among the arguments too."""
    assert plan_start(65534, NOBODY) == StartPlan(drop=False)


def test_another_user_cannot_become_the_user() -> None:
    with pytest.raises(PrivilegeError, match="needs tproxy started as root"):
        plan_start(1000, NOBODY)
