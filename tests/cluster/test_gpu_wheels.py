"""The wheels for a GPU machine without network: what goes in (from this environment's own metadata), and the wheels
written without the members gpu-check never loads. Nothing is downloaded here."""

import zipfile
from importlib import metadata

from cluster.gpu_wheels import NOT_NEEDED, ROOTS, UNUSED, have_names, needed, without


def test_the_bundle_holds_what_serve_needs_at_the_versions_installed_here():
    pins = needed(ROOTS, "3.12", set(NOT_NEEDED))
    for name in ("ray", "transformers", "fastapi", "pydantic", "pydantic-core", "starlette", "uvicorn", "grpcio",
                 "grpcio-health-checking", "grpcio-reflection", "protobuf", "pytest-timeout"):
        assert pins[name] == metadata.version(name), name
    # Left out with what only they need: virtualenv's distlib, transformers' own only through their roots.
    for name in (*NOT_NEEDED, "distlib"):
        assert name not in pins


def test_what_the_gpu_machine_has_is_left_out_but_for_the_roots():
    pins = needed(("transformers",), "3.12", {"transformers", "huggingface-hub", "tokenizers"})
    assert pins["transformers"] == metadata.version("transformers")  # a root: the version the tests pass with
    assert "huggingface-hub" not in pins and "tokenizers" not in pins
    assert "hf-xet" not in pins  # needed through huggingface-hub alone
    assert "hf-xet" in needed(("transformers",), "3.12", set())


def test_have_reads_pip_listings(tmp_path):
    listing = tmp_path / "have.txt"
    listing.write_text("# pip list --format=freeze\nTorch==2.11.0\npydantic_core==2.50.5\n\nnumpy\n"
                       "ray[serve]>=2.0\nsafetensors @ file:///wheels/safetensors.whl\n")
    assert have_names(listing) == {"torch", "pydantic-core", "numpy", "ray", "safetensors"}


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
