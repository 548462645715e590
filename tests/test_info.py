"""``containerd-shim-embed-v1 -info`` (containerd 2.x): its stdout decoded as
containerd.types.RuntimeInfo, for each kind of options containerd sends on stdin.

Run as containerd runs it: the installed program, options on stdin, stdout read whole.  A
fake runc (a shell script) shows which runc it asks for features, with which arguments; the
real one shows what Debian's runc reports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from shim.api import introspection_pb2, runc_options_pb2, runtimeoptions_pb2
from shim.cmd import info, launcher
from shim.oci.runcoptions import decode_options
from shim.util import errors

SHIM = os.path.join(sys.prefix, "bin", launcher.NAME)
#: containerd 2.2.7's own runc shim (see ../shared/containerd2/README.md), where present
RUNC_V2 = Path(__file__).resolve().parents[2] / "shared/containerd2/bin/containerd-shim-runc-v2"
FEATURES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
RUNC_OPTIONS_URL = "containerd.runc.v1.Options"
RUNTIME_OPTIONS_URL = "runtimeoptions.v1.Options"


def run_info(stdin: bytes, path: str | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": path if path is not None else os.environ.get("PATH", "")}
    return subprocess.run(
        [SHIM, "-info"], input=stdin, env=env, capture_output=True, timeout=30, check=False
    )


def decode(out: bytes) -> introspection_pb2.RuntimeInfo:
    msg = introspection_pb2.RuntimeInfo()
    msg.ParseFromString(out)
    # nothing we did not mean to write: re-encoding gives the same bytes
    assert msg.SerializeToString() == out
    return msg


def any_of(type_url: str, value: bytes) -> bytes:
    return any_pb2.Any(type_url=type_url, value=value).SerializeToString()


def runc_options(**kw: object) -> bytes:
    return any_of(RUNC_OPTIONS_URL, runc_options_pb2.Options(**kw).SerializeToString())  # type: ignore[arg-type]


def fake_runc(directory: Path, name: str = "runc", features: str = '{"mountOptions":["rro"]}',
              status: int = 0) -> Path:  # fmt: skip
    """A runc that writes its arguments next to itself and prints ``features``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > "{directory}/{name}.args"\n'
        f"/bin/cat <<'EOF'\n{features}\nEOF\n"
        f"exit {status}\n"
    )
    path.chmod(0o755)
    return path


def args_of(runc: Path) -> str:
    return Path(f"{runc}.args").read_text().strip()


def test_no_options_reports_the_features_of_runc_on_path() -> None:
    runc = shutil.which("runc")
    if runc is None:
        pytest.skip("no runc on PATH")
    r = run_info(b"")
    assert r.returncode == 0, r.stderr
    msg = decode(r.stdout)
    assert msg.name == "io.containerd.embed.v1"
    assert msg.version.version == "0.1.0" and msg.version.revision == ""
    assert not msg.HasField("options") and not msg.annotations
    assert msg.features.type_url == FEATURES_TYPE
    theirs = json.loads(subprocess.run([runc, "features"], capture_output=True, check=True).stdout)
    assert json.loads(msg.features.value) == theirs
    # what CRI looks at: recursive read-only mounts, user namespaces
    assert "rro" in theirs["mountOptions"]
    print(f"\n-info with Debian's runc: {len(r.stdout)} bytes, features {sorted(theirs)}")


@pytest.mark.parametrize("with_options", [False, True], ids=["no-options", "binary_name"])
def test_what_containerd_shim_runc_v2_answers(tmp_path: Path, with_options: bool) -> None:
    """The same RuntimeInfo as containerd 2.2.7's runc shim, but for the name and version:
    the same features (as JSON values: theirs is re-marshalled, ours is runc's own text) and
    the same options back."""
    if not RUNC_V2.exists():
        pytest.skip(f"containerd 2.2.7's runc shim not found at {RUNC_V2}")
    if with_options:
        runc = fake_runc(tmp_path, "my-runc", '{"ociVersionMin": "1.0.0", "hooks": ["prestart"]}')
        stdin = runc_options(binary_name=str(runc), root="/run/r", systemd_cgroup=True)
    elif shutil.which("runc") is None:
        pytest.skip("no runc on PATH")
    else:
        stdin = b""
    r = subprocess.run(
        [str(RUNC_V2), "-info"], input=stdin, capture_output=True, timeout=30, check=True
    )
    theirs = introspection_pb2.RuntimeInfo.FromString(r.stdout)
    ours = decode(run_info(stdin).stdout)
    assert (theirs.name, ours.name) == ("io.containerd.runc.v2", "io.containerd.embed.v1")
    assert ours.features.type_url == theirs.features.type_url == FEATURES_TYPE
    assert json.loads(ours.features.value) == json.loads(theirs.features.value)
    assert ours.options == theirs.options
    assert ours.HasField("options") == theirs.HasField("options") == with_options
    assert dict(ours.annotations) == dict(theirs.annotations) == {}


def test_binary_name_and_root_of_runc_options(tmp_path: Path) -> None:
    runc = fake_runc(tmp_path / "bin", "my-runc", '{"ociVersionMax": "9.9.9"}')
    options = runc_options(binary_name=str(runc), root="/run/somewhere/runc")
    r = run_info(options, path="/nonexistent")
    assert r.returncode == 0, r.stderr
    msg = decode(r.stdout)
    assert json.loads(msg.features.value) == {"ociVersionMax": "9.9.9"}
    assert args_of(runc) == "--root /run/somewhere/runc features"
    # the options come back as they were sent
    assert msg.options.SerializeToString() == options
    assert msg.options.type_url == RUNC_OPTIONS_URL


def test_binary_name_looked_up_on_containerds_path(tmp_path: Path) -> None:
    fake_runc(tmp_path / "a", "runc", '{"which": "a-runc"}')
    crun = fake_runc(tmp_path / "b", "crun", '{"which": "b-crun"}')
    path = f"{tmp_path / 'missing'}:{tmp_path / 'a'}:{tmp_path / 'b'}"
    msg = decode(run_info(runc_options(binary_name="crun"), path).stdout)
    assert json.loads(msg.features.value) == {"which": "b-crun"}
    assert args_of(crun) == "features"  # no --root: none was given
    msg = decode(run_info(runc_options(systemd_cgroup=True), path).stdout)
    assert json.loads(msg.features.value) == {"which": "a-runc"}
    msg = decode(run_info(b"", path).stdout)
    assert json.loads(msg.features.value) == {"which": "a-runc"}


def runtime_options(**kw: object) -> bytes:
    value = runtimeoptions_pb2.Options(**kw).SerializeToString()  # type: ignore[arg-type]
    return any_of(RUNTIME_OPTIONS_URL, value)


def test_cri_runtime_options(tmp_path: Path) -> None:
    """What CRI sends for our handler when it has an ``options`` table: runc's settings in
    its body (containerd 1.7+) or in its ConfigPath file, read as Create reads them."""
    path_runc = fake_runc(tmp_path / "path", "runc", '{"which": "path-runc"}')
    body_runc = fake_runc(tmp_path / "body", "runc", '{"which": "body-runc"}')
    file_runc = fake_runc(tmp_path / "file", "runc", '{"which": "file-runc"}')
    config = tmp_path / "runc.toml"
    config.write_text(f'BinaryName = "{file_runc}"\nRoot = "/run/from-file"\n')
    cases = {
        # the table as TOML: runc's settings by the runc shim's names, any case
        runtime_options(config_body=f'binaryname = "{body_runc}"\nSystemdCgroup = true\n'.encode()):
        ({"which": "body-runc"}, "features", body_runc),
        runtime_options(config_path=str(config)): ({"which": "file-runc"},
                                                   "--root /run/from-file features", file_runc),
        # a table with no runc setting (TypeUrl only): the runc on PATH
        runtime_options(type_url="x"): ({"which": "path-runc"}, "features", path_runc),
    }  # fmt: skip
    for options, (features, args, runc) in cases.items():
        r = run_info(options, str(tmp_path / "path"))
        assert r.returncode == 0, r.stderr
        msg = decode(r.stdout)
        assert json.loads(msg.features.value) == features
        assert args_of(runc) == args
        assert msg.options.SerializeToString() == options


def test_a_runc_without_features_gives_info_without_features(tmp_path: Path) -> None:
    fake_runc(tmp_path, "runc", "No help topic for 'features'", status=3)
    r = run_info(b"", str(tmp_path))
    assert r.returncode == 0, r.stderr
    msg = decode(r.stdout)
    assert msg.name == "io.containerd.embed.v1" and not msg.HasField("features")
    fake_runc(tmp_path, "runc", "not json")
    assert not decode(run_info(b"", str(tmp_path)).stdout).HasField("features")


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (any_of("example.com/Other", b""), "unsupported type 'example.com/Other'"),
        (runc_options(binary_name="bin/runc"), "is neither a command name"),
        (runc_options(binary_name="/usr/../runc"), "is neither a command name"),
        (runc_options(root="relative"), "options.root: 'relative' is not a clean absolute"),
        (runc_options(binary_name="no-such-runc"), "'no-such-runc' not found"),
        (b"\xff\xff", "not a google.protobuf.Any"),
        (runtime_options(config_body=b"BinaryName = 3"), "BinaryName must be a TOML string"),
        (runtime_options(config_body=b"Binary = 'runc'"), "unknown setting 'Binary'"),
        (runtime_options(config_path="/no/such.toml"), "cannot read /no/such.toml"),
    ],
)
def test_options_the_daemon_refuses_are_an_error(
    tmp_path: Path, stdin: bytes, message: str
) -> None:
    fake_runc(tmp_path)
    r = run_info(stdin, str(tmp_path))
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr.decode().startswith("io.containerd.embed.v1 -info: ")
    assert message in r.stderr.decode()


OPTION_CASES = [
    b"",
    any_of("", b""),
    runc_options(),
    runc_options(binary_name="crun", root="/run/r"),
    runc_options(binary_name="/usr/sbin/runc"),
    runc_options(binary_name="/usr/sbin/"),
    runc_options(binary_name="bin/runc"),
    runc_options(binary_name=".."),
    runc_options(binary_name="a" * 256),
    runc_options(root="/"),
    runc_options(root="/a//b"),
    runc_options(root="//a"),
    runc_options(root="/a/./b"),
    runc_options(root="/a/b/"),
    runc_options(root="/a/b/.."),
    runc_options(root="/" + "a" * 5000),
    any_of("type.googleapis.com/containerd.runc.v1.Options", b"\x32\x03abc"),
    any_of(RUNC_OPTIONS_URL, b"\x32"),
    runtime_options(config_path="/x"),
    runtime_options(config_path="relative.toml"),
    runtime_options(config_body=b'BinaryName = "crun"\nRoot = "/r"'),
    runtime_options(config_body=b'binary_name = "crun"'),
    runtime_options(config_body=b"not toml ]]"),
    runtime_options(type_url="x"),
    any_of("runtimeoptions.v1.Other", b""),
]


@pytest.mark.parametrize("options", OPTION_CASES)
def test_info_reads_options_as_create_does(options: bytes) -> None:
    """The runc -info names is the one Create would run: same binary and root, and refused
    where Create refuses the options."""
    a = any_pb2.Any()
    a.ParseFromString(options)
    try:
        theirs: tuple[str, str] | None = None
        opts = decode_options(a.type_url, a.value)
        theirs = (opts.binary, opts.root)
    except errors.TTRPCError:
        theirs = None
    try:
        ours: tuple[str, str] | None = info.runc_for(options)
    except info.InfoError:
        ours = None
    assert ours == theirs
