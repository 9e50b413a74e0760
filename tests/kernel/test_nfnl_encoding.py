"""nfnetlink element encoding against bytes written down once (linux/netfilter/nf_tables.h layout, checked
attribute by attribute when written), not against a second encoder in the module under test: a change to
the hot path's precomputed headers that the kernel would not accept fails here without a kernel."""

import pytest

from tcpha.steering.nfnl import ElementBatch, comment_userdata, flow_key, userdata_comment

KEY = flow_key("10.77.0.2", 40000, "10.77.0.100", 80)
MAC = bytes.fromhex("02000000000b")

# nfgenmsg (family 5 netdev, version 0, res_id 0) | NFTA_SET_ELEM_LIST_TABLE "tbl\0" | .._SET "<name>\0"
HEAD_FORWARD = "05000000" "0800" "0100" "74626c00" "0c00" "0200" "666f727761726400"
HEAD_FROZEN = "05000000" "0800" "0100" "74626c00" "0b00" "0200" "66726f7a656e0000"
# NFTA_SET_ELEM_KEY (nested) { NFTA_DATA_VALUE: the 16-byte concatenated key, each field in a 4-byte slot }
KEY_ATTR = "1800" "0180" "1400" "0100" "0a4d0002" "9c400000" "0a4d0064" "00500000"
# NFTA_SET_ELEM_DATA (nested) { NFTA_DATA_VALUE: MAC + 2 bytes padding }
DATA_ATTR = "1000" "0280" "0a00" "0100" "02000000000b" "0000"

EXAMPLES = [
    # NEWSETELEM, map element with data and a 900 s timeout (NFTA_SET_ELEM_TIMEOUT, u64 ms, big-endian)
    ("add", ("forward", [(KEY, MAC, 900_000)], None), 12, 0x400,
     HEAD_FORWARD + "3c00" "0380" "3800" "0180" + KEY_ATTR + DATA_ATTR + "0c00" "0400" "00000000000dbba0"),
    # set element with a 10 s timeout, no data
    ("add", ("frozen", [(KEY, None, 10_000)], None), 12, 0x400,
     HEAD_FROZEN + "2c00" "0380" "2800" "0180" + KEY_ATTR + "0c00" "0400" "0000000000002710"),
    # DESTROYSETELEM (30): key only
    ("destroy", ("forward", [KEY]), 30, 0,
     HEAD_FORWARD + "2000" "0380" "1c00" "0180" + KEY_ATTR),
    # map element with NFTA_SET_ELEM_USERDATA (6): libnftnl TLV, type 0 (comment), length 25, NUL-terminated
    ("add", ("forward", [(KEY, MAC, 900_000)], [comment_userdata("handoff 0000123400000001")]), 12, 0x400,
     HEAD_FORWARD + "5c00" "0380" "5800" "0180" + KEY_ATTR + DATA_ATTR + "0c00" "0400" "00000000000dbba0"
     + "1f00" "0600" "0019" + "handoff 0000123400000001".encode().hex() + "00" + "00"),
    # a 3-byte key: its value padded to 4 bytes
    ("add", ("s", [(b"\x01\x02\x03", None, None)], None), 12, 0x400,
     "05000000" "0800" "0100" "74626c00" "0600" "0200" "73000000"
     "1400" "0380" "1000" "0180" "0c00" "0180" "0700" "0100" "010203" "00"),
]


@pytest.mark.parametrize("op,args,kind,flags,expected", EXAMPLES)
def test_element_message_bytes(op, args, kind, flags, expected):
    batch = ElementBatch()
    if op == "add":
        name, elements, udata = args
        batch.add(5, "tbl", name, elements, udata)
    else:
        batch.destroy(5, "tbl", *args)
    assert batch.messages == [(kind, flags, bytes.fromhex(expected))]


def test_two_elements_in_one_message_repeat_the_element_bytes():
    batch = ElementBatch()
    batch.add(5, "tbl", "forward", [(KEY, MAC, 900_000)] * 2)
    elem = "3800" "0180" + KEY_ATTR + DATA_ATTR + "0c00" "0400" "00000000000dbba0"
    assert batch.messages[0][2] == bytes.fromhex(HEAD_FORWARD + "7400" "0380" + elem * 2)


def test_userdata_comment_round_trip_and_foreign_userdata():
    assert userdata_comment(comment_userdata("handoff 0000000000000007")) == "handoff 0000000000000007"
    assert userdata_comment(bytes.fromhex("0102ffff")) is None          # a TLV of another type
    assert userdata_comment(None) is None
