"""The chisep command line: argument parsing, simulate, error reporting."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import chisep
from chisep import cli, io, physics


def test_echo_times_in_ms_are_converted_to_seconds():
    assert cli.parse_echo_times_ms("4,10, 16") == pytest.approx((0.004, 0.010, 0.016))


@pytest.mark.parametrize(
    "text, match",
    [
        ("0.004,0.010", "look like seconds"),
        ("10,4", "strictly increasing"),
        ("4,x", "comma-separated numbers"),
        ("", "empty"),
        ("-4,5", "positive"),
        ("4,1001", "below 1000 ms"),
    ],
)
def test_echo_times_parser_refuses_with_hint(text, match):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=match):
        cli.parse_echo_times_ms(text)


def test_echo_times_in_seconds_fail_with_exit_2_and_no_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["simulate", "--phantom", "simple", "--out", str(tmp_path / "s"), "--echo-times", "0.004,0.01"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "look like seconds" in err and "Traceback" not in err
    # the message comes first and short, not after the whole usage block
    assert err.splitlines()[0].startswith("chisep simulate: error:") and "usage:" not in err
    assert len(err.splitlines()) <= 3
    assert not (tmp_path / "s").exists()


def test_unknown_method_lists_valid_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["qsm", "--out", "x", "--inversion", "magic"])
    err = capsys.readouterr().err
    assert "magic" in err and "medi" in err and "tkd" in err


def test_simulate_writes_bids_and_truth_that_load_back(tmp_path):
    out = tmp_path / "sim"
    code = cli.main(["simulate", "--phantom", "simple", "--out", str(out), "--resolution", "4", "--echo-times", "4,10,16,22",
                     "--seed", "3", "--quiet"])
    assert code == 0
    runs = io.find_megre_runs(out)
    assert len(runs) == 1 and runs[0].subject == "phantom" and len(runs[0].magnitude) == 4
    data = io.load_bids(out)
    assert data.acquisition.echo_times == pytest.approx((0.004, 0.010, 0.016, 0.022))
    assert data.acquisition.field_strength == pytest.approx(3.0)
    side = json.loads(runs[0].magnitude[0].with_suffix("").with_suffix(".json").read_text())
    assert side["EchoTime"] == pytest.approx(0.004) and side["MagneticFieldStrength"] == 3.0
    truth = out / "derivatives" / "truth"
    chi_img = nib.load(truth / "chi.nii.gz")
    np.testing.assert_allclose(chi_img.affine, data.affine, atol=1e-5)
    assert chi_img.shape == data.shape[:3]
    chi = np.asarray(chi_img.dataobj)
    mask = np.asarray(nib.load(truth / "brain_mask.nii.gz").dataobj) > 0
    para = np.asarray(nib.load(truth / "chi_para.nii.gz").dataobj)
    dia = np.asarray(nib.load(truth / "chi_dia.nii.gz").dataobj)
    np.testing.assert_allclose(chi[mask], (para - dia)[mask], atol=1e-6)
    assert json.loads((truth / "chi.json").read_text())["Units"] == "ppm"
    assert "globus_pallidus" in (truth / "labels.tsv").read_text()
    # the written local field is the written chi's field with chisep's sign: positive chi, positive
    # frequency (the dipole field of the truth map agrees with it, and not with its negative)
    local = np.asarray(nib.load(truth / "field_local.nii.gz").dataobj)
    assert local[mask].std() > 0.5  # Hz: real tissue contrast at 3 T
    expected = np.asarray(physics.forward_field_hz(np.where(mask, chi, 0).astype(np.float32),
                                                   data.acquisition.field_strength, data.acquisition.voxel_size,
                                                   data.acquisition.b0_direction))
    assert np.corrcoef(local[mask], expected[mask])[0, 1] > 0.9


def test_simulate_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "sim"
    args = ["simulate", "--phantom", "simple", "--out", str(out), "--resolution", "6", "--quiet"]
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0


def test_oblique_simulation_round_trips_b0_direction(tmp_path):
    out = tmp_path / "obl"
    assert cli.main(["simulate", "--phantom", "simple", "--out", str(out), "--resolution", "6", "--b0-angle", "25", "--quiet"]) == 0
    data = io.load_bids(out)
    assert data.acquisition.b0_angle_deg == pytest.approx(25.0, abs=1e-3)
    # the affine written to the NIfTI tilts the voxel axes so that scanner z (B0) lies 25 degrees from
    # voxel z, towards voxel x: (sin 25, 0, cos 25) up to the sign of the axes
    expected = np.array([np.sin(np.radians(25.0)), 0.0, np.cos(np.radians(25.0))])
    assert np.abs(data.acquisition.b0_direction) == pytest.approx(expected, abs=1e-4)


def test_out_path_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert cli.main(["simulate", "--phantom", "simple", "--out", str(f), "--resolution", "6", "--quiet"]) == 2
    assert "expected a folder" in capsys.readouterr().err


def test_python_dash_m_and_console_script_entry_points():
    res = subprocess.run([sys.executable, "-m", "chisep", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("chisep ")
    # the console script pip installs next to this interpreter (what a user types)
    script = Path(sys.executable).with_name("chisep")
    if not script.exists():
        script = shutil.which("chisep")
    assert script is not None, "the 'chisep' console script is not installed (pip install .)"
    res = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == f"chisep {chisep.__version__}\n"


def test_warnings_reach_the_user_as_one_line(tmp_path, capsys):
    """A single-echo run warns; the user sees 'chisep: warning: ...', not a Python warning with source lines."""
    data = tmp_path / "single"
    assert cli.main(["simulate", "--phantom", "simple", "--out", str(data), "--resolution", "6", "--echo-times", "20", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["qsm", "--bids", str(data), "--out", str(tmp_path / "out"), "--quiet",
                     "--inversion", "tkd", "--background", "pdf"]) == 0
    err = capsys.readouterr().err
    assert "chisep: warning: single echo" in err
    assert "UserWarning" not in err and ".py:" not in err


def test_every_option_has_help_and_shows_its_default():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps sub-commands only here
    for name, command in commands.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"chisep {name} {action.option_strings[0]} has no help text"
            shown = formatter._get_help_string(action)
            if action.default is not None and action.default is not False and not action.required:
                assert "default" in shown, f"chisep {name} {action.option_strings[0]} does not show its default"
    assert "(default: single-step)" in " ".join(commands["run"].format_help().split())


def test_help_answers_without_loading_jax():
    # --help must be instant: the parser may import settings, never the numerical stages
    code = ("import sys; from chisep import cli\n"
            "try:\n    cli.main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_demo_takes_the_models_to_run():
    args = cli.build_parser().parse_args(["demo", "--models", "linear,decompose"])
    assert args.models == ("linear", "decompose")
    assert cli.build_parser().parse_args(["demo"]).models is None  # the pipeline's defaults then
