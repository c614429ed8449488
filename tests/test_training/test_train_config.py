"""TrainConfig from arguments, TOML files and flags; every rejected value is named, and the CLI prints one line.

None of these tests loads a model: validation happens before any heavy work.
"""

from __future__ import annotations

import pytest

import personalize as P
from personalize.cli import main
from personalize.commands.train import parse_options
from personalize.errors import UserError
from personalize.train import TrainConfig, load_config, train
from personalize.training.config import VALIDATION_PROMPTS, resolve


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'instance_images = "photos"\noutput-dir = "out"\nmethod = "lora"\nsteps = 40\nlr = 1\n'
        "validation_prompts = ['a {token} {class_noun}']\n[method_options]\nrank = 8\nalpha = 8.0\n"
    )
    config = load_config(path, steps=12, method_options={"rank": 2})
    assert config.steps == 12  # flags win
    assert config.lr == 1.0 and isinstance(config.lr, float)  # TOML integer accepted for a float field
    assert config.method_options == {"rank": 2, "alpha": 8.0}  # options merge per key
    assert config.output_dir == "out" and config.validation_prompts == ["a {token} {class_noun}"]


def test_json_config_of_an_earlier_run(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"instance_images": ["a.png"], "output_dir": "o", "method": "svfit", "steps": 3}')
    assert load_config(path).instance_images == ["a.png"]


@pytest.mark.parametrize(
    "text, message",
    [
        ('instance_images = "p"\noutput_dir = "o"\nstepz = 3\n', r"unknown training setting\(s\) stepz in .*accepted: instance_images"),
        ('instance_images = "p"\noutput_dir = "o"\nsteps = "many"\n', r"setting 'steps' in .* must be int or none, got 'many'"),
        (
            'instance_images = "p"\noutput_dir = "o"\nprior_preservation = 1\n',
            r"'prior_preservation' \(now 'prior'\) must be true or false",
        ),
        ('output_dir = "o"\n', r"missing required setting\(s\): instance_images"),
        ("steps = = 3", r"is not valid TOML"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match=r"config file '.*nope\.toml' cannot be read"):
        load_config(tmp_path / "nope.toml")


def test_method_defaults_fill_steps_and_lr():
    for name in P.METHODS:
        defaults = P.get_method(name).train_defaults
        config = resolve(TrainConfig(instance_images="p", output_dir="o", method=name))
        assert (config.steps, config.lr) == (defaults.steps, defaults.lr)
    assert resolve(TrainConfig(instance_images="p", output_dir="o", steps=7, lr=0.5)).steps == 7
    assert TrainConfig(instance_images="p", output_dir="o").validation_prompts == VALIDATION_PROMPTS


def test_defaults_start_training_in_seconds():
    """No class images unless asked for (diffusers' DreamBooth-LoRA script and kohya have prior preservation off
    by default), and the base model's sampling steps: 25 where images mean something, 3 on random weights."""
    config = resolve(TrainConfig(instance_images="p", output_dir="o"))
    assert (config.prior, config.sample_steps) == ("none", 25)
    steps = {
        m: resolve(TrainConfig(instance_images="p", output_dir="o", base_model=m)).sample_steps for m in ("tiny", "shapes", "sd15-random")
    }
    assert steps == {"tiny": 3, "shapes": 25, "sd15-random": 3}
    assert resolve(TrainConfig(instance_images="p", output_dir="o", base_model="tiny", sample_steps=7)).sample_steps == 7


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method": "nope"}, r"unknown method 'nope'; accepted: .*lora"),
        ({"method": "lora", "method_options": {"rnak": 4}}, r"unknown option\(s\) rnak for method 'lora'; accepted: .*rank"),
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"lr": -1.0}, "lr must be a positive number, got -1.0"),
        ({"resolution": 100}, "resolution must be a multiple of 8 of at least 32 px, got 100"),
        ({"resolution": 24}, "resolution must be a multiple of 8 of at least 32 px, got 24"),
        ({"mixed_precision": "fp8"}, r"mixed_precision 'fp8' is not supported; accepted: auto, no, fp16, bf16"),
        ({"lr_scheduler": "step"}, r"lr_scheduler 'step' is not supported; accepted: constant, cosine, linear"),
        ({"report_to": "wandb"}, r"report_to 'wandb' is not supported; accepted: none, tensorboard"),
        ({"instance_prompt": "a photo of {subject}"}, r"instance_prompt 'a photo of \{subject\}' has an unknown placeholder"),
        ({"instance_prompt": "a photo of a {class_noun}"}, r"instance_prompt must contain \{token\}"),
        ({"validation_prompts": ["{token} {"]}, r"validation_prompts '\{token\} \{' has an unmatched brace"),
        ({"seed": 2**32}, "seed must be an integer from 0 to 4294967295, got 4294967296"),
        ({"seed": -1}, "seed must be an integer from 0 to 4294967295, got -1"),
        ({"resume": True, "overwrite": True}, "either resume .* or overwrite"),
        ({"class_images": 0, "prior": "images"}, "class_images must be at least 1 with prior .images., got 0"),
        ({"snr_gamma": 0.0}, "snr_gamma must be a positive number"),
        ({"prior": "class"}, r"prior 'class' is not supported; accepted: images, model, none"),
        ({"masks": "yes"}, r"masks 'yes' is not supported; accepted: files, auto, off"),
        ({"mask_background_weight": 1.5}, r"mask_background_weight must lie in \[0, 1\], got 1.5"),
        ({"ema_decay": 1.0}, r"ema_decay must lie in \[0, 1\) \(0 = off; 0.999 is typical\), got 1.0"),
        ({"token": " "}, "token must not be empty"),
    ],
)
def test_bad_values_are_named(changes, message):
    with pytest.raises(UserError, match=message):
        resolve(TrainConfig(instance_images="p", output_dir="o", **changes))


def test_parse_options():
    assert parse_options(["rank=8", "alpha=4.5", "preset=attention", 'init="uniform"', "rank_x=none", "flag= true"]) == {
        "rank": "8",
        "alpha": "4.5",
        "preset": "attention",
        "init": "uniform",
        "rank_x": "none",
        "flag": "true",
    }
    assert parse_options([r"targets=attn1\.to_q$"]) == {"targets": r"attn1\.to_q$"}
    with pytest.raises(UserError, match="--option expects NAME=VALUE, got 'rank'"):
        parse_options(["rank"])


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2 and exactly one line on stderr; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_cli_input_errors_are_one_line(capsys, tmp_path, photos):
    out = str(tmp_path / "out")
    base = ["train", "--base-model", "tiny", "--output-dir", out]
    assert "unknown method 'nope'" in cli_error(capsys, base + ["--instance-images", str(photos), "--method", "nope"])
    assert "unknown option(s) depth" in cli_error(capsys, base + ["--instance-images", str(photos), "--option", "depth=3"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"no instance images found in folder '{empty}'" in cli_error(capsys, base + ["--instance-images", str(empty)])
    text = tmp_path / "notes.txt"
    text.write_text("x")
    assert "notes.txt' is not an image file" in cli_error(capsys, base + ["--instance-images", str(text)])
    assert "unknown training setting(s) colour" in cli_error(capsys, ["train", "--config", str(_toml(tmp_path, "colour = 1\n"))])
    assert not (tmp_path / "out").exists()


def _toml(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_fp16_without_gpu_is_refused(photos, tmp_path):
    config = TrainConfig(instance_images=str(photos), output_dir=str(tmp_path / "o"), base_model="tiny", mixed_precision="fp16", cpu=True)
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        train(config)


def test_missing_bitsandbytes_is_explained(fast, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserError, match="optimizer 'adamw8bit' needs bitsandbytes"):
        train(TrainConfig(**{**fast, "optimizer": "adamw8bit"}))


@pytest.mark.parametrize("name", ["snr_gamma", "noise_offset", "prior_loss_weight", "token_lr"])
def test_non_finite_numbers_are_refused_from_every_source(capsys, tmp_path, photos, name):
    """inf passes "> 0" checks and is written as `Infinity` (not JSON) into config.json: refused, flag or TOML or code."""
    flag = "--" + name.replace("_", "-")
    with pytest.raises(UserError, match=rf"^{name} must be a finite number, got inf$"):
        resolve(TrainConfig(instance_images="p", output_dir="o", **{name: float("inf")}))
    with pytest.raises(UserError, match=rf"^{name} must be a finite number, got nan$"):
        resolve(TrainConfig(instance_images="p", output_dir="o", **{name: float("nan")}))
    out = tmp_path / "out"
    base = ["train", "--instance-images", str(photos), "--base-model", "tiny", "--output-dir", str(out)]
    assert f"{name} must be a finite number, got inf" in cli_error(capsys, base + [flag, "inf"])
    assert f"{name} must be a finite number, got inf" in cli_error(capsys, base + ["--config", str(_toml(tmp_path, f"{name} = inf\n"))])
    assert not out.exists()


def test_text_encoder_options_need_train_text_encoder(capsys, tmp_path, photos):
    out = tmp_path / "out"
    base = ["train", "--instance-images", str(photos), "--base-model", "tiny", "--output-dir", str(out)]
    line = cli_error(capsys, base + ["--text-encoder-option", "rank=4"])
    assert "text_encoder_options (rank) apply only with train_text_encoder (--train-text-encoder)" in line
    toml = _toml(tmp_path, "[text_encoder_options]\nrank = 4\n")
    assert "text_encoder_options (rank) apply only with train_text_encoder" in cli_error(capsys, base + ["--config", str(toml)])
    assert not out.exists()
    config = resolve(TrainConfig(instance_images="p", output_dir="o", train_text_encoder=True, text_encoder_options={"rank": 4}))
    assert config.text_encoder_options == {"rank": 4}


def test_shapes_runs_start_from_the_methods_setting(tmp_path, photos, caplog):
    """On the built-in `shapes` model what the caller leaves out comes from the method's setting there (recipe),
    what it names (flags, file) wins, and the log says where the setting came from."""
    from personalize.shapes import recipe
    from personalize.train import effective_config

    caplog.set_level("INFO", logger="personalize.train")
    common = dict(instance_images=str(photos), output_dir=str(tmp_path / "run"), base_model="shapes")
    svfit = effective_config(**common, method="svfit")
    tuned = recipe.train_settings("svfit")
    assert (svfit.lr, svfit.steps, svfit.keep_unconditional, svfit.snr_gamma) == (
        tuned["lr"],
        tuned["steps"],
        recipe.KEEP_UNCONDITIONAL,
        recipe.SNR_GAMMA,
    )
    assert svfit.class_noun == "shape" and svfit.instance_prompt == recipe.INSTANCE_PROMPT
    assert "starting from svfit's" in caplog.text
    named = effective_config(**common, method="lora", lr=1e-3, keep_unconditional=0.0, method_options={"rank": 8})
    assert named.lr == 1e-3 and named.keep_unconditional == 0.0  # named settings win
    assert named.method_options["rank"] == 8 and named.method_options["preset"] == recipe.setting("lora").options["preset"]
    assert effective_config(**{**common, "base_model": "tiny"}, method="svfit").keep_unconditional == 0.0  # other models: defaults
