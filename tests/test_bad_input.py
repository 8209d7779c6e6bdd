"""Every bad input we know of gives one line naming the problem and exit status 2.

docs/reliability.md quotes the number of cases in CASES."""

import json
import shutil
from pathlib import Path

import pytest

from sqdf.cli import main
from sqdf.tasks.digits import shipped_model

TINY = ["--num-steps", "3", "--steps", "1", "--batch-size", "2", "--buffer-size", "4",
        "--device", "cpu", "--no-progress"]  # fmt: skip


def _finished_run(root, task="gmm2d"):
    run = root / f"done-{task}"
    if not run.exists():
        assert main(["train", "--task", task, "--out", str(run), *TINY]) == 0
    return run


def _folder_with(root, files: dict) -> str:
    folder = root / "folder"
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return str(folder)


def _wrong_model_type(root) -> str:
    dst = root / "wrong_type"
    shutil.copytree(shipped_model(), dst)
    cfg = json.loads((dst / "unet" / "config.json").read_text())
    cfg["_class_name"] = "UNet2DConditionModel"
    (dst / "unet" / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def _corrupt_final(root) -> str:
    run = root / "corrupt"
    shutil.copytree(_finished_run(root), run)
    (run / "final" / "policy.safetensors").write_bytes(b"\x00" * 40)
    return str(run)


# (id, argv builder given a tmp folder, expected text in the one-line message)
SD15_UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4}

CASES = [
    ("unknown config key, suggested", lambda r: ["train", "--config", _folder_with(r, {"c.toml": "alhpa = 1.0\n"}) + "/c.toml"],
     "unknown config key 'alhpa' in"),
    ("suggestion names the key", lambda r: ["train", "--config", _folder_with(r, {"c.toml": "alhpa = 1.0\n"}) + "/c.toml"],
     "did you mean 'alpha'?"),
    ("wrong type in TOML", lambda r: ["train", "--config", _folder_with(r, {"c.toml": 'steps = "many"\n'}) + "/c.toml"],
     "steps must be a int, got 'many'"),
    ("invalid TOML", lambda r: ["train", "--config", _folder_with(r, {"c.toml": "alpha = = 1\n"}) + "/c.toml"],
     "is not valid TOML"),
    ("missing config file", lambda r: ["train", "--config", str(r / "none.toml")], "config file not found"),
    ("unknown task", lambda r: ["train", "--task", "imagenet"], "unknown task 'imagenet'"),
    ("unknown method", lambda r: ["train", "--method", "ppo"], "unknown method 'ppo'"),
    ("unknown reward, suggested", lambda r: ["train", "--reward", "linaer"], "did you mean 'linear'?"),
    ("alpha < 0", lambda r: ["train", "--alpha", "-1"], "alpha must be >= 0"),
    ("gamma = 0", lambda r: ["train", "--gamma", "0"], "gamma must be in (0, 1]"),
    ("gamma > 1", lambda r: ["train", "--gamma", "1.01"], "gamma must be in (0, 1]"),
    ("eta = 0 (no KL)", lambda r: ["train", "--eta", "0"], "eta must be in (0, 1]"),
    ("num_steps 1000", lambda r: ["train", "--num-steps", "1000"], "num_steps must be in [1, 999]"),
    ("buffer smaller than batch", lambda r: ["train", "--batch-size", "64", "--buffer-size", "8"],
     "buffer_size must be >= batch_size"),
    ("unknown buffer strategy", lambda r: ["train", "--buffer", "lifo"], "unknown buffer strategy"),
    ("unknown estimator", lambda r: ["train", "--estimator", "oracle"], "unknown estimator"),
    ("no CUDA", lambda r: ["train", "--device", "cuda:7", *TINY[:-3], "--no-progress"],
     "device 'cuda:7'"),
    ("non-float flag", lambda r: ["train", "--alpha", "two"], "invalid float value: 'two'"),
    ("unknown flag", lambda r: ["train", "--alhpa", "1"], "unrecognized arguments: --alhpa"),
    ("task param unknown, suggested", lambda r: ["train", "--task-param", "radiu=2"], "did you mean 'radius'?"),
    ("task param bad value", lambda r: ["train", "--task-param", "std=-1"], "gmm2d std must be > 0"),
    ("reward param unknown", lambda r: ["train", "--reward-param", "c=1"], "unknown parameter 'c' for reward 'linear'"),
    ("reward vector length", lambda r: ["train", "--reward-param", "b=[1, 2, 3]"], "b must have 2 entries"),
    ("reward param type", lambda r: ["train", "--reward", "quadratic", "--reward-param", "curvature=[1]"],
     "reward 'quadratic'"),
    ("reward param without =", lambda r: ["train", "--reward-param", "b"], "expects KEY=VALUE"),
    ("reward for another task", lambda r: ["train", "--task", "digits", "--reward", "linear", *TINY],
     "needs an image reward"),
    ("sd without a model, dry run", lambda r: ["train", "--task", "sd", "--dry-run"], "task 'sd' needs a Stable Diffusion model: --model PATH or a Hub reference"),
    ("custom reward: no module", lambda r: ["train", "--reward", "no_such_mod:f"], "cannot import module 'no_such_mod'"),
    ("custom reward: no module, dry run", lambda r: ["train", "--reward", "no_such_mod:f", "--dry-run"], "cannot import module 'no_such_mod' for reward 'no_such_mod:f': no module of that name on the path"),
    ("custom reward in a mixture: no module, dry run", lambda r: ["train", "--reward", "linear=1,no_such_mod:f=0.5", "--dry-run"], "cannot import module 'no_such_mod' for reward 'no_such_mod:f'"),
    ("custom reward: no parent package, dry run", lambda r: ["train", "--reward", "no_such_pkg.mod:f", "--dry-run"], "cannot import module 'no_such_pkg.mod' for reward 'no_such_pkg.mod:f': no module of that name on the path: No module named 'no_such_pkg'"),
    ("custom reward: no function", lambda r: ["train", "--reward", "json:no_such_function"],
     "has no function 'no_such_function'"),
    ("reward mixture weight not finite", lambda r: ["train", "--task", "digits", "--reward", "ink=1,classifier=inf", "--out", str(r / "x")],
     "the weight of 'classifier' must be a finite number, got 'inf'"),
    ("reward mixture weight not a number", lambda r: ["train", "--task", "digits", "--reward", "ink=lots", "--out", str(r / "x")],
     "the weight of 'ink' must be a finite number, got 'lots'"),
    ("reward named twice in a mixture", lambda r: ["train", "--task", "digits", "--reward", "ink=1,ink=2", "--out", str(r / "x")],
     "names 'ink' twice (label each: ink#a, ink#b)"),
    ("reward mixture parameter without its reward", lambda r: ["train", "--task", "digits", "--reward", "ink=1,classifier=1", "--reward-param", "scale=2", "--out", str(r / "x")],
     "a mixture's parameters name their reward, as NAME.KEY=VALUE"),
    ("reward mixture of two kinds of sample", lambda r: ["train", "--task", "digits", "--reward", "ink=1,linear=1", "--out", str(r / "x")],
     "a reward mixture's rewards must score the same kind of sample"),
    ("reward without a gradient for sqdf", lambda r: ["train", "--task", "digits", "--reward", "jpeg", "--out", str(r / "x")],
     "method 'sqdf' back-propagates the reward's gradient, and reward 'jpeg' is not differentiable"),
    ("jpeg quality out of range", lambda r: ["train", "--task", "digits", "--method", "ddpo", "--buffer", "on_policy", "--reward", "jpeg", "--reward-param", "quality=100", "--out", str(r / "x")],
     "quality must be in 1..95, got 100"),
    ("ink scale not finite", lambda r: ["train", "--task", "digits", "--reward-param", "scale=inf", "--out", str(r / "x")],
     "reward_params.scale must be a finite number, got inf"),
    ("hpsv2 version unknown", lambda r: ["train", "--task", "sd", "--model", _sd_shaped(r), "--reward", "hpsv2", "--reward-param", "version=v3", "--out", str(r / "x")],
     "reward 'hpsv2': version='v3' is not one of v2.0, v2.1"),
    ("missing model folder", lambda r: ["train", "--task", "digits", "--task-param", f"model='{r / 'nowhere'}'", *TINY],
     "no scheduler/scheduler_config.json"),
    ("folder of the wrong model type", lambda r: ["train", "--task", "digits", "--task-param",
                                                  f"model='{_wrong_model_type(r)}'", *TINY],
     "holds a UNet2DConditionModel, not a UNet2DModel"),
    ("digit class out of range", lambda r: ["train", "--task", "digits", "--task-param", "classes=[3, 10]", *TINY],
     "digits classes must be digits 0-9"),
    ("existing run folder", lambda r: ["train", "--out", str(_finished_run(r)), *TINY], "already exists"),
    ("resume a missing folder", lambda r: ["train", "--resume", str(r / "nowhere")], "run folder not found"),
    ("resume as another task", lambda r: ["train", "--resume", str(_finished_run(r)), "--task", "digits"],
     "cannot resume"),
    ("resume with a config file", lambda r: ["train", "--resume", str(_finished_run(r)), "--config", "x.toml"],
     "--resume takes the run's own config"),
    ("eval a missing folder", lambda r: ["eval", str(r / "nowhere")], "run folder not found"),
    ("eval a folder without config.json", lambda r: ["eval", _folder_with(r, {})], "no config.json"),
    ("eval a foreign folder", lambda r: ["eval", _folder_with(r, {"config.json": '{"lr": 1}'})],
     "not written by sqdf"),
    ("eval a folder with broken JSON", lambda r: ["eval", _folder_with(r, {"config.json": "{"})],
     "config.json is not JSON"),
    ("eval corrupt final weights", lambda r: ["eval", _corrupt_final(r)], "do not fit its config"),
    ("eval too few samples", lambda r: ["eval", str(_finished_run(r)), "--num-samples", "1"],
     "num_samples must be >= 2"),
    ("eval prompts on a gmm2d run", lambda r: ["eval", str(_finished_run(r)), "--prompts", "animals"],
     "--prompts is for sd runs"),
    ("eval a cross-reward of another kind of sample", lambda r: ["eval", str(_finished_run(r)), "--rewards", "ink"],
     "reward 'ink' scores image samples, not what the gmm2d task makes (points)"),
    ("eval: a parameter of the run's own reward is checked", lambda r: ["eval", str(_finished_run(r)), "--reward-param", "b=1"],
     "reward 'linear'"),
    ("eval ImageReward", lambda r: ["eval", str(_finished_run(r)), "--rewards", "ImageReward"],
     "unknown reward 'ImageReward'; known rewards:"),
    ("eval LPIPS with a missing weight file", lambda r: ["eval", _sd_run(r), "--lpips", str(r / "none.pth")],
     "LPIPS weight file not found"),
    ("eval LPIPS on images too small", lambda r: ["eval", _sd_run(r), "--lpips"],
     "LPIPS (AlexNet) needs images of at least 31 px a side; these are 16"),
    ("eval FID with a missing weight file", lambda r: ["eval", _sd_run(r), "--fid", str(r / "none.pth")],
     "FID Inception weight file not found"),
    ("eval DreamSim with a missing folder", lambda r: ["eval", _sd_run(r), "--dreamsim", str(r / "none")],
     "DreamSim weights folder not found"),
    ("eval an unknown DreamSim type", lambda r: ["eval", _sd_run(r), "--dreamsim", "--dreamsim-type", "vit_tiny"],
     "unknown DreamSim type 'vit_tiny'; known: ensemble"),
    ("eval LPIPS on a gmm2d run", lambda r: ["eval", str(_finished_run(r)), "--lpips"], "--lpips is for sd runs"),
    ("gaussian posterior estimator on digits", lambda r: ["train", "--task", "digits", "--estimator", "gaussian_posterior", "--out", str(r / "x")],
     "for samples of at most 64; task 'digits' has 256: use q_cov 'isotropic' (one backward pass), or tweedie or consistency"),
    ("unknown posterior covariance", lambda r: ["train", "--q-cov", "diagonal"], "unknown q_cov 'diagonal'; known: full, isotropic"),
    ("no trace probes", lambda r: ["train", "--q-probes", "0"], "q_probes must be >= 1, got 0"),
    ("unknown buffer store", lambda r: ["train", "--buffer-store", "cloud"], "unknown buffer_store 'cloud'; known: memory, disk"),
    ("unknown buffer dtype", lambda r: ["train", "--buffer-dtype", "int8"], "unknown buffer_dtype 'int8'; known: float32, bfloat16, float16, auto"),
    ("ddpo with a half-precision buffer", lambda r: ["train", "--method", "ddpo", "--buffer", "on_policy", "--buffer-dtype", "bfloat16"], "method 'ddpo' takes likelihood ratios of the stored steps"),
    ("frontier updates not finite", lambda r: ["compare", "--frontier", "--methods", "draft", "--frontier-values", "draft=inf", "--out", str(r / "c")], "draft: steps values must be numbers, got inf"),
    ("zero posterior draws", lambda r: ["train", "--q-draws", "0"], "q_draws must be >= 1, got 0"),
    ("exact estimator on digits", lambda r: ["train", "--task", "digits", "--estimator", "exact", "--out", str(r / "x")],
     "estimator 'exact' needs the closed-form posterior of task gmm2d; task 'digits' has tweedie and consistency"),
    ("negative eval_every", lambda r: ["train", "--eval-every", "-2", "--out", str(r / "x")],
     "eval_every must be >= 0, got -2"),
    ("sample zero samples", lambda r: ["sample", str(_finished_run(r)), "--num-samples", "0"],
     "num_samples must be >= 1"),
    ("pretrain gmm2d", lambda r: ["pretrain", "--task", "gmm2d", "--out", str(r / "x")], "only 'digits'"),
    ("distill from a missing base", lambda r: ["distill-cm", "--base", str(r / "nowhere"), "--steps", "1"],
     "config.json missing"),
    ("compare an unknown method", lambda r: ["compare", "--methods", "sqdf,ppo", "--out", str(r / "c")], "unknown method 'ppo'"),
    ("compare a bad sweep", lambda r: ["compare", "--sweep", "gamma", "--out", str(r / "c")], "--sweep expects KEY=V1,V2"),
    ("compare zero seeds", lambda r: ["compare", "--seeds", "0", "--out", str(r / "c")], "seeds must be >= 1"),
    ("compare best of zero", lambda r: ["compare", "--best-of", "0", "--out", str(r / "c")], "--best-of must be >= 1"),
    ("compare one eval sample", lambda r: ["compare", "--num-samples", "1", "--out", str(r / "c")], "--num-samples must be >= 2"),
    ("compare zero steps", lambda r: ["compare", "--steps", "0", "--out", str(r / "c")], "steps must be >= 1"),
    ("compare a method twice", lambda r: ["compare", "--methods", "sqdf,draft,sqdf", "--out", str(r / "c")], "'sqdf' is listed twice"),
    ("compare a bad method param", lambda r: ["compare", "--methods", "sqdf,draft", "--set", "method_params={kk = 2}", "--out", str(r / "c")], "unknown parameter 'kk'"),
    ("compare an unknown reward", lambda r: ["compare", "--set", "reward=nope", "--out", str(r / "c")], "nope"),
    ("demo zero steps", lambda r: ["demo", "--steps", "0", "--out", str(r / "d")], "steps must be >= 1"),
    ("gmm2d at alpha 0", lambda r: ["train", "--task", "gmm2d", "--alpha", "0", "--out", str(r / "x")], "needs alpha > 0, got alpha 0.0"),
    ("classifier target not an int", lambda r: ["train", "--task", "digits", "--reward", "classifier", "--reward-param", "target=3.0", "--out", str(r / "x")], "target must be a digit 0-9 or unset, got 3.0"),
    ("compare sweeping gmm2d alpha to 0", lambda r: ["compare", "--methods", "sqdf", "--sweep", "alpha=0.5,0", "--out", str(r / "c")], "needs alpha > 0, got alpha 0"),
    ("frontier with a sweep", lambda r: ["compare", "--frontier", "--sweep", "gamma=1.0", "--out", str(r / "c")], "drop --sweep"),
    ("frontier values without --frontier", lambda r: ["compare", "--frontier-values", "sqdf=1", "--out", str(r / "c")], "--frontier-values needs --frontier"),
    ("frontier values in a bad form", lambda r: ["compare", "--frontier", "--frontier-values", "sqdf", "--out", str(r / "c")], "expects METHOD=V1,V2"),
    ("frontier values for a method not compared", lambda r: ["compare", "--frontier", "--methods", "sqdf", "--frontier-values", "ddpo=1", "--out", str(r / "c")], "names 'ddpo', which is not in --methods"),
    ("frontier values given twice", lambda r: ["compare", "--frontier", "--frontier-values", "sqdf=1", "--frontier-values", "sqdf=2", "--out", str(r / "c")], "gives 'sqdf' twice"),
    ("frontier best-of-N not whole", lambda r: ["compare", "--frontier", "--methods", "best_of_n", "--frontier-values", "best_of_n=2.5", "--out", str(r / "c")], "whole numbers >= 1, got 2.5"),
    ("frontier alpha of 0 on gmm2d", lambda r: ["compare", "--frontier", "--methods", "sqdf", "--frontier-values", "sqdf=1,0", "--out", str(r / "c")], "needs alpha > 0, got alpha 0"),
    ("bbo resume with methods", lambda r: ["bbo", "--resume", str(r), "--methods", "sqdf"], "--resume takes the folder's own settings"),
    ("a negative seed", lambda r: ["train", "--seed", "-1"], "seed must be in [0, 2**63)"),
    ("method param unknown", lambda r: ["train", "--method", "draft", "--method-param", "kk=2"], "did you mean 'k'?"),
    ("DDPO without its buffer", lambda r: ["train", "--method", "ddpo"], "needs buffer = 'on_policy'"),
    ("GRPO std unknown", lambda r: ["train", "--method", "grpo", "--buffer", "on_policy", "--method-param", "std=biased"], "unknown std 'biased'; known: sample, population"),
    ("GRPO timestep_fraction of 0", lambda r: ["train", "--method", "grpo", "--buffer", "on_policy", "--method-param", "timestep_fraction=0"], "timestep_fraction must be in (0, 1], got 0"),
    ("GRPO flow_grpo KL on a DDIM task", lambda r: ["train", "--method", "grpo", "--buffer", "on_policy", "--method-param", "kl_scale=flow_grpo", "--out", str(r / "x")], "KL scale 'flow_grpo' is Flow-GRPO's beta on the flow SDE's step; DDIMKernel has no flow grid"),
    ("GRPO flow_grpo KL on a DDIM task, dry run", lambda r: ["train", "--method", "grpo", "--buffer", "on_policy", "--method-param", "kl_scale=flow_grpo", "--dry-run"], "method 'grpo': KL scale 'flow_grpo' is Flow-GRPO's beta on the flow SDE's step, and this gmm2d task samples with DDIM"),
    ("pretrain on a bad device", lambda r: ["pretrain", "--out", str(r / "x"), "--device", "tpu"],
     "unknown device 'tpu'"),
    ("sd without a model folder", lambda r: ["train", "--task", "sd", "--reward", "ink", "--out", str(r / "x")],
     "needs a Stable Diffusion model: --model PATH or a Hub reference"),
    ("sd model by Hub id, offline and not cached", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", "org/not-cached", "--out", str(r / "x")],
     "task 'sd' model: org/not-cached is not in the Hub cache"),
    ("sd with an SD index but no parts", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _folder_with(r, {"model_index.json": '{"_class_name": "StableDiffusionPipeline"}'}), "--out", str(r / "x")],
     "is not a complete SD 1.x/2.x folder (missing unet/, vae/, text_encoder/, tokenizer/, scheduler/)"),
    ("sd with an empty prompts file", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_shaped(r), "--prompts", _folder_with(r, {"p.txt": "\n"}) + "/p.txt", "--out", str(r / "x")],
     "has no prompts"),
    ("sd with a missing prompts file", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_shaped(r), "--prompts", str(r / "none.txt"), "--out", str(r / "x")],
     "neither a built-in set"),
    ("sd render without a model", lambda r: ["sample", "--task", "sd"], "needs --model PATH"),
    ("aesthetic head that is not one", lambda r: ["convert-aesthetic-head", _not_a_head(r), str(r / "h.safetensors")],
     "not an aesthetic-head state dict"),
    ("pickscore's default weights offline, not cached", lambda r: ["train", "--task", "sd", "--model", _sd_shaped(r), "--reward", "pickscore", "--out", str(r / "x")],
     "yuvalkirstain/PickScore_v1@a4e4367c6dfa7288a00c550414478f865b875800 is not in the Hub cache"),
    ("imagereward med_config not found", lambda r: ["train", "--task", "sd", "--model", _sd_shaped(r), "--reward", "imagereward", "--reward-param", f"med_config={r / 'none.json'}", "--out", str(r / "x")],
     "none.json' not found; it is med_config.json from the Hugging Face Hub repository THUDM/ImageReward"),
    ("imagereward checkpoint not found", lambda r: ["train", "--task", "sd", "--model", _sd_shaped(r), "--reward", "imagereward", "--reward-param", f"checkpoint={r / 'none.pt'}", "--out", str(r / "x")],
     "none.pt' not found; it is ImageReward.pt from the Hugging Face Hub repository THUDM/ImageReward"),
    ("unknown finetune", lambda r: ["train", "--task", "digits", "--task-param", "finetune=half", "--out", str(r / "x")],
     "digits finetune must be one of lora, full, got 'half'"),
    ("compile not a boolean", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_shaped(r), "--task-param", "compile=1", "--out", str(r / "x")],
     "sd compile must be true or false, got 1"),
    ("unknown quantize_base", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_shaped(r), "--task-param", "quantize_base=int4", "--out", str(r / "x")],
     "sd quantize_base must be one of none, int8, got 'int4'"),
    ("int8 base under full fine-tuning", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_shaped(r), "--task-param", "finetune=full", "--task-param", "quantize_base=int8", "--out", str(r / "x")],
     "sd quantize_base int8: the quantised base is the frozen one under a LoRA"),
    ("unknown preset, suggested", lambda r: ["train", "--preset", "sd15-aesthtic"], "did you mean 'sd15-aesthetic'?"),
    ("preset of another task", lambda r: ["train", "--preset", "sd15-aesthetic", "--task", "gmm2d"], "is a 'sd' run; it cannot be used with task 'gmm2d'"),
    ("preset without the paths it needs", lambda r: ["train", "--preset", "sd15-hpsv2", "--model", _sd_shaped(r)], "needs --prompts FILE"),
    ("BBO preset given to train", lambda r: ["train", "--preset", "sd15-bbo-aesthetic"], "run it with sqdf bbo --preset"),
    ("BBO preset given to compare", lambda r: ["compare", "--preset", "sd15-bbo-aesthetic"], "add --bbo"),
    ("--preset when resuming", lambda r: ["train", "--resume", str(_finished_run(r)), "--preset", "digits-demo"], "--resume takes the run's own config"),
    ("sd folder without model_index.json or parts", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _folder_with(r, {"README.md": "no pipeline here"}), "--out", str(r / "x")],
     "is not a complete SD 1.x/2.x folder (missing unet/, vae/, text_encoder/, tokenizer/, scheduler/)"),
    ("SDXL index over an SD 1.x UNet", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_configs(r, {"sample_size": 64}, "StableDiffusionXLPipeline", xl=True), "--out", str(r / "x")],
     "unet has addition_embed_type None, where SDXL UNets have 'text_time': the folder mixes families"),
    ("sd scheduler of the EDM kind", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_scheduler(r, {"_class_name": "EDMDPMSolverMultistepScheduler"}), "--out", str(r / "x")],
     "scheduler is a EDMDPMSolverMultistepScheduler; sqdf samples with DDIM on a DDPM noise schedule"),
    ("sd folder of an unsupported pipeline", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_shaped(r, "PixArtAlphaPipeline"), "--out", str(r / "x")],
     "holds a PixArtAlphaPipeline; supported: StableDiffusionPipeline (SD 1.x/2.x), StableDiffusionXLPipeline (SDXL)"),
    ("SDXL folder without its second text encoder", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_shaped(r, "StableDiffusionXLPipeline"), "--out", str(r / "x")],
     "is not a complete SDXL folder (missing text_encoder_2/, tokenizer_2/)"),
    ("unknown experiment tracker", lambda r: ["train", "--log-with", "tensorboard,tensorbord", "--out", str(r / "x")],
     "unknown tracker 'tensorbord' in log_with; known: tensorboard, wandb, mlflow, trackio"),
    ("negative sample_every", lambda r: ["train", "--sample-every", "-1", "--out", str(r / "x")],
     "sample_every must be >= 0, got -1"),
    ("ema_decay of 1", lambda r: ["train", "--ema-decay", "1", "--out", str(r / "x")],
     "ema_decay must be in [0, 1), got 1.0"),
    ("unknown lr_schedule", lambda r: ["train", "--lr-schedule", "step"],
     "unknown lr_schedule 'step'; known: constant, cosine, linear"),
    ("negative lr_warmup", lambda r: ["train", "--lr-warmup", "-1"], "lr_warmup must be in [0, steps), got -1"),
    ("warm-up as long as the run", lambda r: ["train", "--steps", "10", "--lr-warmup", "10"],
     "lr_warmup must be in [0, steps), got 10 (steps 10)"),
    ("lr_min above lr", lambda r: ["train", "--lr-schedule", "cosine", "--lr", "1e-4", "--lr-min", "1e-3"],
     "lr_min must be in [0, lr) = [0, 0.0001), got 0.001"),
    ("lr_min without a decay", lambda r: ["train", "--lr-min", "1e-5"], "constant has none, got lr_min 1e-05"),
    ("bbo with an lr schedule", lambda r: ["bbo", "--set", "lr_schedule=cosine", "--out", str(r / "b")],
     "sqdf bbo fine-tunes every round at a constant lr"),
    ("unknown gmm2d process", lambda r: ["train", "--task-param", "process=ode"], "gmm2d process must be one of vp, flow"),
    ("flow without noise", lambda r: ["train", "--task-param", "process=flow", "--task-param", "noise_level=0"], "gmm2d noise_level must be > 0"),
    ("DDIM's eta on the flow process", lambda r: ["train", "--task-param", "process=flow", "--eta", "0.5"], "eta is DDIM's; the flow process's noise is task_params.noise_level"),
    ("a flow setting on the vp process", lambda r: ["train", "--task-param", "noise_level=0.3"], "gmm2d noise_level = 0.3: noise_level, noise_level_end and shift are the flow process's"),
    ("a noise schedule on the vp process", lambda r: ["train", "--task-param", "noise_level_end=0.3"], "gmm2d noise_level_end = 0.3: noise_level, noise_level_end and shift"),
    ("a noise schedule on the vp process, dry run", lambda r: ["train", "--task-param", "noise_level_end=0.3", "--dry-run"], "gmm2d noise_level_end = 0.3: noise_level, noise_level_end and shift"),
    ("a noise schedule ending without noise", lambda r: ["train", "--task-param", "process=flow", "--task-param", "noise_level_end=0"], "gmm2d noise_level_end must be > 0 (the KL needs a stochastic step), got 0"),
    ("unknown kl_scale", lambda r: ["train", "--kl-scale", "avg"], "unknown kl_scale 'avg'"),
    ("dry run on an SD folder without configs", lambda r: ["train", "--task", "sd", "--model", _sd_shaped(r), "--dry-run"], "unet/config.json"),
    ("dry run with method parameters the method refuses", lambda r: ["train", "--method", "alignprop", "--method-param", "k_min=3", "--method-param", "k_max=2", "--dry-run"], "method 'alignprop': need 1 <= k_min <= k_max"),
    ("dry run against a GPU memory that is not a size", lambda r: ["train", "--dry-run", "--gpu-memory", "lots"], "--gpu-memory 'lots': give a size such as 24GiB"),
    ("bbo's GPU memory without its dry run", lambda r: ["bbo", "--gpu-memory", "24GiB", "--out", str(r / "b")], "--gpu-memory 24GiB goes with --dry-run"),
    ("query schedule of the wrong length", lambda r: ["bbo", "--query-schedule", "8,16", "--rounds", "3"], "query_schedule has 2 entries for 3 rounds"),
    ("query schedule with a non-integer", lambda r: ["bbo", "--query-schedule", "8,x"], "expected integers separated by commas"),
    ("query schedule with a round of 1", lambda r: ["bbo", "--query-schedule", "8,1", "--rounds", "2"], "query_schedule must hold integers >= 2"),
    ("query schedule and a per-round count", lambda r: ["bbo", "--query-schedule", "8,16", "--rounds", "2", "--queries-per-round", "100"], "give query_schedule or queries_per_round, not both"),
    ("dry run on an SD folder whose UNet config lacks its size", lambda r: ["train", "--task", "sd", "--model", _sd_configs(r, unet={"in_channels": 4}), "--dry-run"], "lacks a usable 'sample_size'"),
    ("best-of-N with an uneven schedule", lambda r: ["bbo", "--methods", "best_of_n", "--query-schedule", "8,16", "--rounds", "2"], "needs the same number of queries every round"),
    ("best-of-N with an uneven schedule says what to pass", lambda r: ["bbo", "--methods", "sqdf,best_of_n", "--query-schedule", "8,16", "--rounds", "2"], "leave it out of --methods (e.g. --methods sqdf)"),
    ("compare without --task and an unknown method", lambda r: ["compare", "--methods", "sqdf,nope", "--out", str(r / "c")], "unknown method 'nope'"),
    ("a prefix of a flag is not that flag", lambda r: ["compare", "--updates", "0", "--out", str(r / "c")], "unrecognized arguments: --updates 0"),
    ("infinite reward parameter", lambda r: ["train", "--reward", "quadratic", "--reward-param", "curvature=inf"], "reward_params.curvature must be a finite number, got inf"),
    ("infinite reward parameter in compare", lambda r: ["compare", "--reward-param", "scale=inf", "--out", str(r / "c")], "reward_params.scale must be a finite number, got inf"),
    ("NaN setting", lambda r: ["train", "--alpha", "nan"], "alpha must be a finite number, got nan"),
    ("NaN task parameter in a config file", lambda r: ["train", "--config", _folder_with(r, {"c.toml": "[task_params]\nstd = nan\n"}) + "/c.toml"], "task_params.std must be a finite number, got nan"),
    ("infinite BBO setting", lambda r: ["bbo", "--kappa", "inf", "--out", str(r / "b")], "kappa must be a finite number, got inf"),
    ("train --out that cannot be made", lambda r: ["train", "--out", "/proc/sqdf/x", *TINY], "cannot make run folder /proc/sqdf/x: No such file or directory"),
    ("bbo --out that cannot be made", lambda r: ["bbo", "--out", "/proc/sqdf/x", "--rounds", "1", "--no-progress"], "cannot make output folder /proc/sqdf/x"),
    ("compare --out that cannot be made", lambda r: ["compare", "--out", "/proc/sqdf/x", "--seeds", "1", "--steps", "1", "--no-progress"], "/proc/sqdf"),
    ("--out that is a file", lambda r: ["train", "--out", _folder_with(r, {"f": ""}) + "/f", *TINY], "is a file, not a folder"),
    ("--out under a file", lambda r: ["bbo", "--out", _folder_with(r, {"f": ""}) + "/f/x", "--rounds", "1", "--no-progress"], "cannot make output folder"),
    ("empty --config", lambda r: ["train", "--config", ""], "argument --config: expected a value, got an empty text"),
    ("empty --task", lambda r: ["compare", "--task", ""], "argument --task: expected a value, got an empty text"),
    ("empty query schedule", lambda r: ["bbo", "--query-schedule", ""], "expected integers separated by commas"),
    ("BBO method parameter no chosen method has", lambda r: ["bbo", "--methods", "sqdf", "--method-param", "kk=2", "--out", str(r / "b")], "unknown method parameter 'kk' for sqdf"),
    ("sd render flag on a run", lambda r: ["sample", str(_finished_run(r)), "--guidance", "3"], "--guidance is for sqdf sample --task sd"),
    ("sd render with an infinite guidance", lambda r: ["sample", "--task", "sd", "--model", _sd_shaped(r), "--guidance", "inf", "--device", "cpu"], "--guidance must be a finite number >= 0, got inf"),
    ("sample --out under a file", lambda r: ["sample", str(_finished_run(r)), "--out", _folder_with(r, {"f": ""}) + "/f/s.png"], "is a file, not a folder"),
    ("compare --model for a task without one", lambda r: ["compare", "--model", "x", "--out", str(r / "c")], "unknown parameter 'model'"),
    ("eval --task-param over a run's own", lambda r: ["eval", str(_finished_run(r)), "--task-param", "std=-1"], "gmm2d std must be > 0"),
    ("sd render with a parameter it does not take", lambda r: ["sample", "--task", "sd", "--model", _sd_shaped(r), "--task-param", "resolution=256", "--device", "cpu"],
     "--task-param resolution: sqdf sample --task sd renders with model, prompts, guidance and --num-steps only"),
    ("sd render with a reward parameter", lambda r: ["sample", "--task", "sd", "--model", _sd_shaped(r), "--reward-param", "scale=2", "--device", "cpu"],
     "--reward-param: sqdf sample --task sd renders without a reward"),
    ("sample a run with a reward parameter", lambda r: ["sample", str(_finished_run(r)), "--reward-param", "b=[0.0, 1.0]"],
     "--reward-param: sqdf sample draws samples without scoring them"),
    ("sample --preset with a run", lambda r: ["sample", str(_finished_run(r)), "--preset", "sd15-aesthetic"], "give --preset without RUN"),
    ("sd render from a folder with neither LoRA nor UNet", lambda r: ["sample", "--task", "sd", "--model", _sd_shaped(r), "--lora", _folder_with(r, {}), "--device", "cpu"],
     "holds neither pytorch_lora_weights.safetensors nor unet/"),
    ("negative fresh trajectories", lambda r: ["train", "--fresh-trajectories", "-1"],
     "fresh_trajectories must be in [0, buffer_size] = [0, 1024], got -1"),
    ("more fresh trajectories than the buffer holds", lambda r: ["train", "--fresh-trajectories", "2000"],
     "fresh_trajectories must be in [0, buffer_size] = [0, 1024], got 2000"),
    ("unknown buffer scope", lambda r: ["train", "--buffer-scope", "global"], "unknown buffer_scope 'global'; known: process, shared"),
    ("GRPO sweep over a shared buffer", lambda r: ["train", "--method", "grpo", "--buffer", "on_policy", "--buffer-scope", "shared", "--method-param", "cell_order=sweep", "--out", str(r / "x")],
     "method 'grpo': cell_order sweep with buffer_scope shared trains the same union"),
    ("fresh trajectories with truncated rollouts", lambda r: ["train", "--rollout", "truncated", "--buffer", "on_policy", "--fresh-trajectories", "4"],
     "rollout 'truncated' samples each micro-batch fresh and keeps no buffer"),
    ("fresh trajectories not whole groups", lambda r: ["train", "--method", "grpo", "--buffer", "on_policy", "--batch-size", "8", "--fresh-trajectories", "6", "--method-param", "group_size=4", "--out", str(r / "x")],
     "which must divide fresh_trajectories 6"),
    ("unknown LoRA init", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_configs(r, SD15_UNET), "--task-param", "lora_init=xavier", "--out", str(r / "x")],
     "sd lora_init must be one of default, gaussian, got 'xavier'"),
    ("unknown LCM timesteps", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_configs(r, SD15_UNET), "--task-param", "lcm_timesteps=nearest", "--out", str(r / "x")],
     "sd lcm_timesteps must be one of chain, distilled, got 'nearest'"),
    ("reference_compat not a boolean", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_configs(r, SD15_UNET), "--task-param", "reference_compat=1", "--out", str(r / "x")],
     "sd reference_compat must be true or false, got 1"),
    ("tf32 not a boolean", lambda r: ["train", "--task", "sd", "--reward", "ink", "--model", _sd_configs(r, SD15_UNET), "--task-param", "tf32='yes'", "--out", str(r / "x")],
     "sd tf32 must be true or false, got 'yes'"),
    ("positive reward mask not a boolean", lambda r: ["train", "--method-param", "positive_reward_mask=2", "--out", str(r / "x")],
     "positive_reward_mask must be true or false, got 2"),
]  # fmt: skip


def _sd_shaped(root, pipeline: str = "StableDiffusionPipeline") -> str:
    """A folder with the five SD subfolders (empty) and a model_index.json naming
    ``pipeline``: enough to get past the layout check."""
    folder = root / f"{pipeline}_shaped"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    return str(folder)


def _sd_configs(root, unet: dict, pipeline: str = "StableDiffusionPipeline", xl=False) -> str:
    """The SD (or, with ``xl``, SDXL) layout with a UNet config as given and an SD 1.5 VAE
    config."""
    folder = Path(_sd_shaped(root, pipeline))
    if xl:
        for name in ("text_encoder_2", "tokenizer_2"):
            (folder / name).mkdir(exist_ok=True)
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    vae = {"block_out_channels": [128, 256, 512, 512]}
    (folder / "vae" / "config.json").write_text(json.dumps(vae))
    return str(folder)


def _sd_scheduler(root, scheduler: dict) -> str:
    """The SD layout with a scheduler config as given."""
    folder = Path(_sd_shaped(root))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return str(folder)


def _sd_run(root) -> str:
    """A run folder whose config.json is an sd run's on a model folder of configs only (16 px
    images): enough for sqdf eval's checks, which come before the model loads."""
    from sqdf.run.settings import make_config

    model = _sd_configs(root, {"sample_size": 2, "in_channels": 4})
    cfg = make_config({"task": "sd", "task_params": {"model": model}}, source="test")
    run = root / "sd-run"
    run.mkdir(exist_ok=True)
    (run / "config.json").write_text(json.dumps({"format": "sqdf-run", "train": cfg.to_dict()}))
    return str(run)


def _not_a_head(root) -> str:
    import torch

    path = root / "not_head.pth"
    torch.save({"weight": torch.zeros(2)}, str(path))
    return str(path)


@pytest.mark.parametrize("build,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(build, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = build(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert expected in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_an_int8_base_without_torchao_is_one_line(tmp_path, monkeypatch, capsys):
    """torchao is an optional extra: without it, quantize_base=int8 says how to install it
    (torchao hidden here, so the case runs whether or not it is installed)."""
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    argv = ["train", "--task", "sd", "--reward", "ink", "--model", _sd_shaped(tmp_path),
            "--task-param", "quantize_base=int8", "--out", str(tmp_path / "x")]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "sd quantize_base int8 needs torchao: pip install 'sqdf[quant]'" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
