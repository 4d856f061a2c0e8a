"""Where the micro model loses background fidelity: the x0 prediction's background fidelity at every sampling step.

    python bench/micro_background.py                                  # the shipped weights, 48 samples
    python bench/micro_background.py --model runs/micro/model --name micro_background_attempt10

For held-out samples of the `eval` split (20 DDIM steps, guidance 2, as `bench/micro_eval.py`), two figures per
step of the schedule, both scored with `concord.micro.evaluate`'s background rule (every channel within 0.1 of
the grey, on the pixels the depth calls background):
- `trajectory`: the guided x0 prediction along an ordinary sampling run (the project's one sampler loop,
  `concord.pipelines.sampler.sample`, read through its `after_x0` hook, which changes nothing);
- `from_truth`: the x0 prediction for the ground truth noised to that step's t by the forward process -- the
  input the model was trained on;
- `one_step`: the x0 prediction for the input that self-correction (`concord.micro.train.own_trajectory_input`,
  `--self-correct`) trains on at that t: the ground truth noised to a higher t' (one uniform draw in [t, 999] per
  sample), the model's x0 prediction there, and one DDIM step down to t on the background pixels (the object's
  pixels from the forward process). It tells whether a model that keeps a bleed along its trajectory has learned to
  remove the bleed of the inputs it was trained to correct.
The final sample's fidelity is `bench/micro_eval.py`'s figure. A trajectory that stays below `from_truth` at low
noise means the model keeps what earlier steps painted (exposure bias) rather than failing on clean inputs.
Prints a table and writes bench/results/NAME.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_micro_arguments, load_micro_for_bench, quiet_diffusion, report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    quiet_diffusion()
    import torch

    from concord.micro.data import generate_batch
    from concord.micro.evaluate import background_fidelity
    from concord.micro.model import micro_parts
    from concord.micro.train import _higher_timesteps, latent_layout, own_trajectory_input
    from concord.pipelines.depth_image import depth_to_control
    from concord.pipelines.sampler import Hooks, abar_at, fresh_scheduler, guided_output, sample, x0_from_output

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_micro_arguments(p, samples=48, name="micro_background")
    args = p.parse_args(argv)
    if args.samples < 1 or args.steps < 1:
        print("micro_background: error: --samples and --steps must be >= 1", file=sys.stderr)
        return 2
    pipe = load_micro_for_bench(args, "micro_background")
    if pipe is None:
        return 2
    parts = micro_parts(pipe)
    den, codec = parts.denoiser, parts.codec
    b = generate_batch(args.samples, args.seed, index=0, height=64, width=64, split="eval")

    def fidelity(x0: torch.Tensor) -> float:
        return background_fidelity(codec.decode(x0).clamp(0, 1).permute(0, 2, 3, 1).numpy(), b.mask)

    n = args.samples
    embs = [parts.text_embeddings(prompt, "", guidance=True) for prompt in b.prompts]  # each [uncond, cond]
    emb = torch.cat([torch.cat([e[:1] for e in embs]), torch.cat([e[1:] for e in embs])])
    latent_hw = (64 // 2, 64 // 2)
    control = torch.cat([den.prepare_control(torch.from_numpy(depth_to_control(d))[None, None], latent_hw) for d in b.depth])
    control = torch.cat([control, control])

    def model_output(xin, t):  # classifier-free guidance over [uncond, cond]; t a timestep or one per [uncond, cond] row
        return guided_output(den.predict(torch.cat([xin, xin]), t, emb, control).float(), args.guidance)

    x0_true = codec.encode(torch.from_numpy(b.images).permute(0, 3, 1, 2)).float()
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(x0_true.shape, generator=gen)
    start = torch.randn(x0_true.shape, generator=gen)
    trajectory: list[tuple[int, float]] = []

    def record(info, x0):
        trajectory.append((int(info.t), fidelity(x0)))
        return x0

    with torch.no_grad():
        final = sample(model_output, pipe.scheduler, start, args.steps, hooks=Hooks(after_x0=record))
        sched = fresh_scheduler(pipe.scheduler)
        sched.set_timesteps(args.steps)
        ptype = sched.config.get("prediction_type", "epsilon")
        from_truth, one_step = [], []
        own = latent_layout(~b.mask) > 0.5  # the background pixels, in the latents' layout
        abar_all = sched.alphas_cumprod.float()
        T = len(abar_all)
        for t in sched.timesteps:
            x_t = sched.add_noise(x0_true, noise, t.repeat(n))
            xin = sched.scale_model_input(x_t, t)
            from_truth.append(fidelity(x0_from_output(model_output(xin, t), xin, abar_at(sched, t), ptype)))
            # the self-correction's training input at t (v-prediction models only: the training's parametrisation)
            if ptype != "v_prediction":
                one_step.append(None)
                continue
            t_hi = _higher_timesteps(gen, t.repeat(n), 1, False, T)  # the trainer's own draw of t'
            abar_hi = abar_all[t_hi].view(-1, 1, 1, 1)
            x_hi = sched.add_noise(x0_true, torch.randn(x0_true.shape, generator=gen), t_hi)
            v_hi = model_output(x_hi, torch.cat([t_hi, t_hi]))  # one t' per sample, for [uncond, cond] alike
            x_in, _ = own_trajectory_input(x_hi, x0_true, v_hi, abar_hi, abar_all[int(t)].view(1, 1, 1, 1), noise, own)
            one_step.append(fidelity(x0_from_output(model_output(x_in, t), x_in, abar_at(sched, t), ptype)))
    rows = [
        {"step": i, "t": t, "trajectory": traj, "from_truth": truth, "one_step": own_fid}
        for i, ((t, traj), truth, own_fid) in enumerate(zip(trajectory, from_truth, one_step))
    ]
    rows.append({"step": "final", "t": 0, "trajectory": fidelity(final), "from_truth": None, "one_step": None})
    for r in rows:
        r.update(model=args.model, samples=n, steps=args.steps, guidance=args.guidance, seed=args.seed)
    report(args.name, rows, ["step", "t", "trajectory", "from_truth", "one_step"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
