"""The kernel argument structs declared in moe_flashcomm/kernels.py match their declarations in
csrc/: every field's offset and every struct's size, as nvcc lays them out. A host program
that includes the .cu files prints sizeof/offsetof; it needs nvcc (CI has it), no GPU."""
import shutil
import subprocess

import pytest

from moe_flashcomm import kernels as K

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


# csrc/p2p.cu's constants that moe_flashcomm/kernels.py restates
CONSTANTS = {"kMaxPeers": K.MAX_PEERS, "kLanded": K.P2P_LANDED, "kFreed": K.P2P_FREED,
             "kCounter": K.P2P_COUNTER, "kStamp": K.P2P_STAMP, "kTicket": K.P2P_TICKET,
             "kDone": K.P2P_DONE, "kErrSet": K.P2P_ERROR_SET,
             "kErrKind": K.P2P_ERROR_KIND, "kErrStamp": K.P2P_ERROR_STAMP,
             "kErrFreedTimeout": K.P2P_ERROR_FREED_TIMEOUT,
             "kErrLandedTimeout": K.P2P_ERROR_LANDED_TIMEOUT,
             "kWaitFreed": K.WAIT_FREED, "kPublishLanded": K.PUBLISH_LANDED,
             "kWaitLanded": K.WAIT_LANDED, "kPublishFreed": K.PUBLISH_FREED,
             "kStage": K.EXCHANGE_STAGE, "kStampBytes": K.STAMP_BYTES,
             "kErrReduceStamp": K.P2P_ERROR_REDUCE_STAMP,
             "kErrReduceNumel": K.P2P_ERROR_REDUCE_NUMEL,
             "kStampChecks": K.STAMP_CHECKS}


def _probe_source() -> str:
    lines = ['#include <cstdio>', '#include <cstddef>', '#include "allreduce.cu"',
             '#include "p2p.cu"', '#include "stamp_check.cu"', 'int main() {']
    for name, (dtype, _) in K.STRUCTS.items():
        lines.append(f'  std::printf("{name} size %zu\\n", sizeof(mfc::{name}));')
        for field in dtype.names:
            lines.append(f'  std::printf("{name}.{field} %zu\\n", offsetof(mfc::{name}, {field}));')
    for name in CONSTANTS:
        lines.append(f'  std::printf("{name} %d\\n", (int)mfc::{name});')
    lines.append("  return 0;\n}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    d = tmp_path_factory.mktemp("structs")
    src = d / "probe.cu"
    src.write_text(_probe_source())
    exe = d / "probe"
    build = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", f"-I{K.csrc_dir()}", str(src),
                            "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return dict(line.rsplit(" ", 1) for line in run.stdout.splitlines())


@pytest.mark.parametrize("name", sorted(K.STRUCTS))
def test_struct_matches_the_cu_declaration(layout, name):
    dtype, source = K.STRUCTS[name]
    assert int(layout[f"{name} size"]) == dtype.itemsize, f"sizeof({name}) in csrc/{source}"
    for field in dtype.names:
        got = int(layout[f"{name}.{field}"])
        assert got == dtype.fields[field][1], f"offsetof({name}, {field}) in csrc/{source}"


def test_constants_match_the_cu_declarations(layout):
    for name, value in CONSTANTS.items():
        assert int(layout[name]) == value, f"mfc::{name} in csrc/p2p.cu"
    # the flag words: every peer's stamp, then the exchange's two counters, the last of them;
    # the error page's "reported" word
    assert K.P2P_TICKET == K.P2P_STAMP + K.MAX_PEERS
    assert K.P2P_FLAG_WORDS == K.P2P_DONE + 1
    assert K.P2P_ERROR_WORDS == K.P2P_ERROR_SET + 1
