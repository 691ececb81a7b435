"""`slimserve repo add | list | manifest`, driven through the real command-line parser."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slimserve.cli import build_parser, main
from slimserve.repository import verify_manifest

from .conftest import IN, OUT


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _table(text: str) -> list[list[str]]:
    """Rows of `repo list` split on runs of 2+ spaces."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in text.strip().splitlines()]


def test_every_repo_option_has_help():
    parser = build_parser()
    repo = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "repo"
    ]
    subs = next(a for a in repo._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subs) == {"add", "list", "manifest", "encrypt", "decrypt"}
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help, f"repo {name} {action.option_strings or action.dest}: no help"


def test_add_onnx_prints_the_written_model_yaml(tmp_path, capsys, dynamic_onnx):
    code, out, _ = _run(
        capsys,
        "repo",
        "add",
        "mlp",
        str(dynamic_onnx),
        "--repository",
        str(tmp_path),
        "--max-batch-size",
        "16",
    )
    assert code == 0
    assert f"added mlp version 1 at {tmp_path / 'mlp' / '1'}" in out
    printed = yaml.safe_load(out.split("\n", 1)[1])
    assert printed == yaml.safe_load((tmp_path / "mlp" / "model.yaml").read_text())
    assert printed["batching"]["max_batch_size"] == 16


def test_add_safetensors_with_class_args_and_shape(tmp_path, capsys, lenet_safetensors):
    code, _out, _ = _run(
        capsys,
        "repo",
        "add",
        "lenet",
        str(lenet_safetensors),
        "-r",
        str(tmp_path),
        "--model-class",
        "slimserve.zoo:LeNet5",
        "--model-args",
        '{"num_classes": 10}',
        "--input-shape",
        "1,28,28",
        "--version",
        "3",
    )
    assert code == 0
    config = yaml.safe_load((tmp_path / "lenet" / "model.yaml").read_text())
    assert config["model_args"] == {"num_classes": 10}
    assert config["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert (tmp_path / "lenet" / "3" / "model.safetensors").is_file()


def test_add_transformers_folder_with_task(tmp_path, capsys, tiny_classifier):
    code, out, _ = _run(
        capsys,
        "repo",
        "add",
        "clf",
        str(tiny_classifier),
        "-r",
        str(tmp_path),
        "--task",
        "sequence-classification",
    )
    assert code == 0
    assert "task: sequence-classification" in out


def test_add_notes_go_to_stderr(tmp_path, capsys, fixed_onnx):
    code, _, err = _run(capsys, "repo", "add", "fixed", str(fixed_onnx), "-r", str(tmp_path))
    assert code == 0
    assert err.startswith("note: batching is off")


def test_add_errors_exit_2_with_the_reason(tmp_path, capsys, mlp_safetensors):
    code, _out, err = _run(capsys, "repo", "add", "t", str(mlp_safetensors), "-r", str(tmp_path))
    assert code == 2
    assert "error:" in err and "--model-class" in err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--model-args", "{not json", "not valid JSON"),
        ("--model-args", "[1, 2]", "give a JSON object"),
        ("--input-shape", "1,x", "integers separated by commas"),
        ("--input-shape", "0,28", "positive sizes"),
    ],
)
def test_bad_option_values_are_explained(tmp_path, capsys, mlp_safetensors, flag, value, message):
    with pytest.raises(SystemExit) as exc:
        main(["repo", "add", "t", str(mlp_safetensors), "-r", str(tmp_path), flag, value])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _variant(version_dir: Path, name: str, source: Path) -> Path:
    folder = version_dir / "variants" / name
    folder.mkdir(parents=True)
    shutil.copyfile(source, folder / "model.onnx")
    (folder / "variant.yaml").write_text("recipe: int8\nprofile: {size_bytes: 100}\n")
    return folder


def test_list_shows_versions_variants_sizes_and_manifests(
    tmp_path, capsys, dynamic_onnx, mlp_safetensors
):
    main(["repo", "add", "mlp", str(dynamic_onnx), "-r", str(tmp_path)])
    main(["repo", "add", "mlp", str(dynamic_onnx), "-r", str(tmp_path)])
    main(
        [
            "repo",
            "add",
            "t",
            str(mlp_safetensors),
            "-r",
            str(tmp_path),
            "--model-class",
            "slimserve.zoo:MLP",
            "--model-args",
            json.dumps({"sizes": [IN, 8, OUT]}),
        ]
    )
    _variant(tmp_path / "mlp" / "2", "int8", dynamic_onnx)  # hand-made: no manifest
    (tmp_path / "mlp" / "1" / "model.onnx").write_bytes(b"tampered")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.yaml").write_text("backend: tensorflow\n")
    capsys.readouterr()

    code, out, _ = _run(capsys, "repo", "list", "-r", str(tmp_path))

    assert code == 0
    rows = _table(out)
    assert rows[0] == ["MODEL", "VERSION", "VARIANT", "BACKEND", "SIZE", "MANIFEST"]
    by_key = {(r[0], r[1], r[2]): r for r in rows[1:]}
    assert by_key[("mlp", "1", "-")][5].startswith("MISMATCH")
    assert "model.onnx" in by_key[("mlp", "1", "-")][5]
    assert by_key[("mlp", "2", "-")][3] == "onnx" and by_key[("mlp", "2", "-")][5] == "ok"
    assert by_key[("mlp", "2", "int8")][5].startswith("none")
    assert by_key[("t", "1", "-")][3] == "torch"
    assert "model.yaml invalid" in by_key[("broken", "-", "-")][5]
    size = by_key[("mlp", "2", "-")][4]
    expected = (tmp_path / "mlp" / "2" / "model.onnx").stat().st_size + (
        tmp_path / "mlp" / "2" / "MANIFEST.json"
    ).stat().st_size
    assert size == f"{expected} B"  # the variant's files are not counted in the version


def test_list_reports_a_version_linked_out_of_the_repository(tmp_path, capsys, dynamic_onnx):
    main(["repo", "add", "mlp", str(dynamic_onnx), "-r", str(tmp_path / "repo")])
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "repo" / "mlp" / "2").symlink_to(outside)
    capsys.readouterr()
    code, out, _ = _run(capsys, "repo", "list", "-r", str(tmp_path / "repo"))
    assert code == 0
    rows = {(r[0], r[1]): r for r in _table(out)[1:]}
    assert rows[("mlp", "1")][5] == "ok"
    assert rows[("mlp", "2")][5].startswith("refused: ") and "outside" in rows[("mlp", "2")][5]


def test_list_without_verification_does_not_hash(tmp_path, capsys, dynamic_onnx):
    main(["repo", "add", "mlp", str(dynamic_onnx), "-r", str(tmp_path)])
    (tmp_path / "mlp" / "1" / "model.onnx").write_bytes(b"tampered")
    capsys.readouterr()
    code, out, _ = _run(capsys, "repo", "list", "-r", str(tmp_path), "--no-verify")
    assert code == 0
    assert _table(out)[1][5] == "present"


def test_list_of_an_empty_or_missing_repository(tmp_path, capsys):
    code, out, _ = _run(capsys, "repo", "list", "-r", str(tmp_path))
    assert code == 0 and "no models" in out
    code, _, err = _run(capsys, "repo", "list", "-r", str(tmp_path / "nope"))
    assert code == 2 and "no such folder" in err


def test_manifest_accepts_a_deliberate_edit(tmp_path, capsys, dynamic_onnx):
    main(["repo", "add", "mlp", str(dynamic_onnx), "-r", str(tmp_path)])
    main(["repo", "add", "mlp", str(dynamic_onnx), "-r", str(tmp_path)])
    variant = _variant(tmp_path / "mlp" / "2", "int8", dynamic_onnx)
    for version in ("1", "2"):
        (tmp_path / "mlp" / version / "notes.txt").write_text("edited by hand")
    capsys.readouterr()

    code, out, _ = _run(capsys, "repo", "manifest", "mlp", "-r", str(tmp_path), "--version", "2")

    assert code == 0
    assert out.splitlines() == [
        f"wrote {tmp_path / 'mlp' / '2' / 'MANIFEST.json'}",
        f"wrote {variant / 'MANIFEST.json'}",
    ]
    assert verify_manifest(tmp_path / "mlp" / "2") and verify_manifest(variant)
    with pytest.raises(Exception, match=r"notes.txt"):
        verify_manifest(tmp_path / "mlp" / "1")  # not asked for: still refused
    code, out, _ = _run(capsys, "repo", "manifest", "mlp", "-r", str(tmp_path))
    assert code == 0 and verify_manifest(tmp_path / "mlp" / "1")


def test_manifest_of_an_unknown_model_or_version(tmp_path, capsys, dynamic_onnx):
    main(["repo", "add", "mlp", str(dynamic_onnx), "-r", str(tmp_path)])
    capsys.readouterr()
    code, _, err = _run(capsys, "repo", "manifest", "nope", "-r", str(tmp_path))
    assert code == 2 and "model 'nope' is not in the repository" in err
    code, _, err = _run(capsys, "repo", "manifest", "mlp", "-r", str(tmp_path), "--version", "9")
    assert code == 2 and "no version 9" in err


def test_the_installed_command_runs(tmp_path, dynamic_onnx):
    """The console entry point, as a user types it."""
    add = subprocess.run(
        [
            sys.executable,
            "-m",
            "slimserve",
            "repo",
            "add",
            "mlp",
            str(dynamic_onnx),
            "--repository",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert add.returncode == 0, add.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "slimserve", "repo", "list", "--repository", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert _table(listed.stdout)[1][:4] == ["mlp", "1", "-", "onnx"]


def test_add_refuses_a_language_model_of_an_unsupported_architecture(
    tmp_path, capsys, tiny_classifier
):
    code, _, err = _run(
        capsys,
        "repo",
        "add",
        "lm",
        str(tiny_classifier),
        "-r",
        str(tmp_path / "r"),
        "--task",
        "text-generation",
    )
    assert code == 2
    assert "model_type 'bert' is not an architecture the generation engine runs" in err
    assert "llama (" in err and "qwen2 (" in err and "gemma2 (" in err  # the supported list
    assert not (tmp_path / "r" / "lm").exists()


def test_add_accepts_a_supported_language_model_architecture(tmp_path, capsys, tiny_classifier):
    folder = tmp_path / "qwen"
    shutil.copytree(tiny_classifier, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    code, out, _ = _run(capsys, "repo", "add", "qwen", str(folder), "-r", str(tmp_path / "r"))
    assert code == 0, out
    assert "task: text-generation" in out
