import subprocess
import sys

import pytest

from cnn.config import Config, ConfigError, build, parse_args, to_dict, validate
from conftest import REPO, child_env, clear_launcher_env


def test_schema_defaults():
    cfg = build()
    assert isinstance(cfg, Config)
    assert cfg.train.batch_size == 128 and cfg.optim.lr == 4e-3 and cfg.precision == "auto"


def test_default_yaml_spells_out_the_schema_defaults():
    """`python train_ddp.py` with no --config runs the same recipe as configs/default.yaml."""
    assert build(REPO / "configs" / "default.yaml") == build()


def test_precedence_cli_over_file_over_schema(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 5\n  batch_size: 64\noptim:\n  lr: 0.01\n")
    cfg = build(f, ["train.epochs=7"])
    assert cfg.train.epochs == 7  # command line beats file
    assert cfg.train.batch_size == 64  # file beats schema
    assert cfg.optim.lr == 0.01
    assert cfg.train.max_steps == 0  # schema default survives


def test_default_yaml_is_valid():
    cfg = build(REPO / "configs" / "default.yaml")
    # the file repeats the schema's defaults (a reader sees the recipe in one place): it must not drift
    assert to_dict(cfg) == to_dict(build(None))
    assert cfg.train.epochs == 0.5 and cfg.optim.muon_lr > 0 and cfg.optim.label_smoothing > 0


def test_wandb_agent_style_arguments():
    cfg = parse_args(["--optim.lr=0.005", "--train.batch_size=256", "precision=fp32"])
    assert cfg.optim.lr == 0.005 and cfg.train.batch_size == 256 and cfg.precision == "fp32"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.nope=1", "train.nope"),
        ("nonsense=1", "nonsense"),
        ("train.epochs=abc", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("optim.lr=-0.1", "optim.lr"),
        ("train.epochs=0", "train.epochs"),
        ("precision=fp8", "precision"),
        ("model.dropout=1.5", "model.dropout"),
        ("optim.schedule=step", "optim.schedule"),
        ("train.compile_mode=fast", "train.compile_mode"),
        ("wandb.mode=sometimes", "wandb.mode"),
        ("checkpoint.resume=", "checkpoint.resume"),
        ("checkpoint.fault_kind=freeze", "checkpoint.fault_kind"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        ("dist.timeout_s=0", "dist.timeout_s"),
        ("dist.init_timeout_s=30", "dist.init_timeout_s"),  # shorter than dist.timeout_s (60)
        ("data.train_subset=10", "data.train_subset"),
        ("train.profile_steps=[5]", "train.profile_steps"),
        ("train.profile_steps=[6,5]", "train.profile_steps"),
        ("train.profile_steps=[0,2]", "train.profile_steps"),
        ("train.debug_delay_ms=-1", "train.debug_delay_ms"),
        ("train.debug_delay_rank=1", "train.debug_delay_rank"),
        ("wandb.system_metrics=maybe", "wandb.system_metrics"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        build(None, [override])
    msg = str(info.value)
    assert key in msg and "\n" not in msg


def test_missing_config_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="write train.epochs=VALUE"):
        build(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="key=value"):
        build(None, ["nonsense"])
    with pytest.raises(ConfigError, match="unrecognised"):
        parse_args(["--bogus"])


def test_global_batch_must_divide_by_world_size():
    cfg = build(None, ["train.batch_size=100"])
    validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match="train.batch_size.*world size 3"):
        validate(cfg, world_size=3)


@pytest.mark.parametrize("env, world_size", [
    # plain `python train_ddp.py` inside an salloc of 3 tasks: no job step, so one process
    ({"SLURM_NTASKS": "3", "SLURM_JOB_ID": "7"}, 1),
    ({"SLURM_NTASKS": "3", "SLURM_STEP_NUM_TASKS": "3", "SLURM_PROCID": "0"}, 3),  # srun: 3 tasks
    ({"SLURM_NTASKS": "3", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, 1),  # srun --ntasks=1 in it
    ({"SLURM_NTASKS": "3", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     2),  # torchrun inside the allocation
])
def test_world_size_comes_from_the_launcher_detection(monkeypatch, env, world_size):
    """Validation and setup() read the world size from one place, distributed.launch_env."""
    from cnn.distributed import launch_env
    clear_launcher_env(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch_env().world_size == world_size
    if world_size == 3:  # the global batch of 2 is divisible by 1 and 2, not by 3
        with pytest.raises(ConfigError, match="train.batch_size: global batch 2 is not divisible by the world size 3"):
            build(None, ["train.batch_size=2"])
    else:
        build(None, ["train.batch_size=2"])


def test_checkpoint_path_is_not_checked_at_config_time():
    """Rank 0 reads it (cnn.checkpoint.resume): other nodes need not see the file."""
    assert build(None, ["checkpoint.resume=/only/on/rank0/step-00000010.pt"]).checkpoint.resume.startswith("/only")


def test_bad_config_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "train_ddp.py", "optim.lr=-1"], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.lr" in lines[0]


def test_bad_config_fails_on_every_rank_without_waiting():
    """Each rank validates before joining the process group: it exits 2 by itself, no hang.

    The ranks are started by hand (not torchrun, whose agent kills the survivors as soon
    as the first rank fails, so their messages may never be printed)."""
    from conftest import ranks
    procs = ranks(2, "train.batch_size=129", timeout=120)
    assert [p.returncode for p in procs] == [2, 2]
    for err in (p.stderr for p in procs):  # batch 129 is not divisible by world size 2
        assert err.strip().splitlines() == [
            "config error: train.batch_size: global batch 129 is not divisible by the world size 2"]


def test_bad_config_under_torchrun_fails_the_job():
    from conftest import torchrun
    proc = subprocess.run(torchrun(2, "train.batch_size=129"), cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "config error: train.batch_size" in proc.stderr


def test_help_lists_every_key_with_type_default_and_doc_from_the_schema(capsys):
    """`--help` is generated from the dataclasses: every leaf key, its annotated type, its
    default and the docstring under the field, grouped under its section's heading."""
    import dataclasses

    from cnn import config

    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    keys = config.schema_keys()
    # the same leaves as omegaconf's own view of the schema
    assert {k.name for k in keys} == set(config._flat_keys(config.to_dict(build())))
    for k in keys:
        line = next(x for x in lines if x.split() and x.split()[0] == k.name)
        assert k.type in line and k.doc and line.endswith(k.doc), line
    # the doc text really is the source's: spot-check two against the dataclass source
    assert "Peak Adam learning rate." in next(x for x in lines if x.split()[:1] == ["optim.lr"])
    assert dataclasses.fields(config.OptimConfig)[0].name == "lr"
    for section, doc in config.sections().items():  # grouped: a heading per section, its keys below it
        head = lines.index(f"{section}: {doc}")
        assert lines[head + 1].split()[0].startswith(f"{section}.")


@pytest.mark.parametrize("argv, expected", [
    (["optim.learning_rate=0.002"], "unknown key 'optim.learning_rate'; did you mean 'optim.lr'? "
                                    "(optim keys: lr, muon_lr, muon_ns_steps, weight_decay, label_smoothing, schedule, warmup_frac)"),
    (["--optim.lr", "0.002"], "'--optim.lr 0.002' is not an override: write optim.lr=0.002"),
    (["--lr", "0.002"], "'--lr 0.002' is not an override: write optim.lr=0.002 ('lr' is not a key)"),
    (["optim.lr", "0.002"], "override 'optim.lr 0.002' has no '=': write optim.lr=0.002"),
    (["train.epoch=2"], "did you mean 'train.epochs'?"),
    (["batch_size=64"], "did you mean 'train.batch_size'?"),
    (["optimizer.lr=1"], "did you mean 'optim.lr'?"),
    (["wandb.projct=x"], "did you mean 'wandb.project'?"),
])
def test_unknown_keys_and_habits_get_the_right_spelling(argv, expected):
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_unknown_key_in_a_config_file_names_the_file_and_the_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 0.01\n")
    with pytest.raises(ConfigError, match=rf"{f}: unknown key 'optim.learning_rate'; did you mean 'optim.lr'\?"):
        build(f)
