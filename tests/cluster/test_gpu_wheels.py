"""The wheels for a GPU machine without network: what goes in (from this environment's own metadata), and the wheels
written without the members gpu-check never loads. Nothing is downloaded here."""

import zipfile
from importlib import metadata

from cluster.gpu_wheels import NOT_NEEDED, UNUSED, have_versions, needed, roots, without

SKIP = set(NOT_NEEDED)


def test_the_bundle_holds_what_serving_needs_at_the_versions_installed_here():
    pins = needed(roots(), "3.12", {}, SKIP)
    for name in ("ray", "transformers", "fastapi", "pydantic", "pydantic-core", "starlette", "uvicorn", "grpcio",
                 "grpcio-health-checking", "grpcio-reflection", "protobuf", "safetensors", "pytest-timeout"):
        assert pins[name] == metadata.version(name), name
    # Left out with what only they need: the machine's own torch and its dependencies, virtualenv's distlib.
    for name in (*NOT_NEEDED, "distlib", "sympy", "triton"):
        assert name not in pins


def test_what_the_gpu_machine_has_is_left_out_where_its_version_will_do():
    machine = {"transformers": "5.17.0", "huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "protobuf": "5.29.3",
               "numpy": None, "grpcio": "1.90.0"}
    pins = needed(roots(), "3.12", machine, SKIP)
    assert pins["transformers"] == metadata.version("transformers")  # pinned here at 5.23.0: 5.17 will not do
    assert pins["protobuf"] == metadata.version("protobuf")  # the generated code needs >= 7.35
    assert {"huggingface-hub", "tokenizers", "numpy", "grpcio"}.isdisjoint(pins)
    assert "hf-xet" not in pins  # needed through huggingface-hub alone
    assert "hf-xet" in needed(roots(), "3.12", {}, SKIP)


def test_have_reads_pip_listings(tmp_path):
    listing = tmp_path / "have.txt"
    listing.write_text("# pip list --format=freeze\nTorch==2.11.0\npydantic_core==2.50.5\n\nnumpy\n"
                       "safetensors @ file:///wheels/safetensors.whl\n")
    assert have_versions(listing) == {"torch": "2.11.0", "pydantic-core": "2.50.5", "numpy": None,
                                      "safetensors": None}


def test_a_wheel_is_written_without_its_unused_members_nor_their_record_lines(tmp_path):
    wheel = tmp_path / "transformers-5.23.0-py3-none-any.whl"
    members = ["transformers/__init__.py", "transformers/models/__init__.py", "transformers/models/bert/model.py",
               "transformers/models/t5/model.py", "transformers/models/switch_transformers/model.py",
               "transformers/models/auto/auto.py"]
    record = "".join(f"{name},sha256=x,1\n" for name in members) + "transformers-5.23.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in members:
            zf.writestr(name, f"# {name}\n")
        zf.writestr("transformers-5.23.0.dist-info/RECORD", record)
    without(wheel, *UNUSED["transformers"])
    with zipfile.ZipFile(wheel) as zf:
        kept = set(zf.namelist())
        assert kept == set(members) - {"transformers/models/bert/model.py"} | {"transformers-5.23.0.dist-info/RECORD"}
        assert zf.read("transformers/models/t5/model.py") == b"# transformers/models/t5/model.py\n"
        lines = zf.read("transformers-5.23.0.dist-info/RECORD").decode().splitlines()
    assert [line.split(",")[0] for line in lines] == [name for name in members if "bert" not in name] + [
        "transformers-5.23.0.dist-info/RECORD"]
