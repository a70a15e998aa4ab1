"""diffusers' server pattern through one installation: shared components with ``accelerate_fusion``
installed once, per request ``Pipeline.from_pipe(shared, scheduler=<its own>)``, requests in threads.
Every request gives, bit for bit, the image it gives alone (every method, weights mode, coverage
policy, tau mode; step counts, schedulers, per-call scales, num_images_per_prompt that differ); where
runs cannot be told apart a RuntimeError says so.

The prompt embeddings are computed once beforehand: CLIP's text encoder run concurrently with the
UNet differs from its alone result now and then with plain PEFT too (outside lorafuse)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lorafuse.engine import RunTable, SamplingRun, fuse_modules  # noqa: E402
from lorafuse.integrations import accelerate_fusion  # noqa: E402

from .test_diffusers import make  # noqa: E402
from .test_fallbacks import conv_pair  # noqa: E402
from .tiny import run_kwargs  # noqa: E402

METHODS = ("klora", "est", "kl", "merge", "subject", "style")
WEIGHTS = ("scratch", "inplace", "off")
# (steps, seed, extra call kwargs) of four requests
REQUESTS = [(1, 0, {}), (2, 1, {}), (1, 2, {}), (2, 3, {})]
ROUNDS = 2


def _embeds(pipe):
    with torch.no_grad():
        pos, neg = pipe.encode_prompt("a photo of sks dog", "cpu", 1, True, negative_prompt="")
    return pos, neg


@pytest.fixture(scope="module")
def shared():
    pipe = make("sd15")
    return pipe, _embeds(pipe)


def request_pipe(shared, scheduler_cls=None):
    """A request's pipeline: the shared components, a fresh scheduler (of ``scheduler_cls``)."""
    cls = scheduler_cls or type(shared.scheduler)
    pipe = type(shared).from_pipe(shared, scheduler=cls.from_config(shared.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, embeds, steps, seed, **extra):
    pos, neg = embeds
    with torch.no_grad():
        return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=steps, guidance_scale=6.0,
                    height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(seed),
                    **extra).images


def in_threads(jobs):
    """Run the callables ``jobs`` in one thread each, started together; their results in order."""
    out, errors = [None] * len(jobs), []
    start = threading.Barrier(len(jobs))

    def work(i):
        try:
            start.wait()
            out[i] = jobs[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def check_server_pattern(shared, embeds, requests=REQUESTS, rounds=ROUNDS, schedulers=None):
    """Each request alone, then ``rounds`` rounds of all of them in threads: bit-identical images."""
    schedulers = schedulers or [None] * len(requests)
    alone = [generate(request_pipe(shared, sc), embeds, *req[:2], **req[2]) for req, sc in zip(requests, schedulers)]
    for r in range(rounds):
        pipes = [request_pipe(shared, sc) for sc in schedulers]
        jobs = [lambda p=p, req=req: generate(p, embeds, *req[:2], **req[2]) for p, req in zip(pipes, requests)]
        for i, (a, b) in enumerate(zip(alone, in_threads(jobs))):
            assert torch.equal(a, b), f"round {r}, request {i}: max |diff| {(a - b).abs().max().item():.3g}"
    return alone


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("method", METHODS)
def test_concurrent_requests_give_their_alone_images(shared, method, weights):
    pipe, embeds = shared
    h = accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", weights=weights)
    try:
        alone = check_server_pattern(pipe, embeds)
        assert h.summary()["path"] == ("fused" if method == "kl" or weights == "off" else "merged")
    finally:
        h.remove()
    assert not torch.equal(alone[1], alone[3])  # different seeds: different images


@pytest.mark.parametrize("method", ["klora", "est"])
def test_official_tau_mode(shared, method):
    """The official counter mode counts steps per run: each request its own step and num_steps."""
    pipe, embeds = shared
    for weights in ("scratch", "inplace"):
        with accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", weights=weights, tau_mode="official"):
            check_server_pattern(pipe, embeds, rounds=1)


def test_triton_backend(shared):
    """The Triton kernels (interpreted on a CPU): the merged weights' grouped rebuilds."""
    pipe, embeds = shared
    with accelerate_fusion(pipe, "sbj", "sty", "klora", backend="triton"):
        check_server_pattern(pipe, embeds, requests=[(1, 0, {}), (2, 1, {})], rounds=1)


def test_kl_speculative_gates_are_per_run():
    """kl on Triton carries each layer's speculative gates from call to call (its per-run state):
    two runs interleaved call by call give the outputs each gives alone."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(16, 24)
    lora = lambda r, s: (torch.randn(r, 16, generator=g) * s, torch.randn(24, r, generator=g) * s, 1.0)  # noqa: E731
    fused = fuse_modules([lin], subjects=[lora(2, 0.5)], styles=[lora(4, 0.5)], method="kl", backend="triton")
    xs = {name: [torch.randn(2, 5, 16, generator=g) for _ in range(3)] for name in "ab"}
    engine = fused.engine
    alone = {}
    for name in "ab":
        run = engine.start_run(name)
        alone[name] = []
        for x in xs[name]:
            engine.begin_call(0.5, run=run)
            alone[name].append(lin(x))
    runs = {name: engine.start_run(name + "'") for name in "ab"}
    for i in range(3):
        for name in "ab":
            engine.begin_call(0.5, run=runs[name])
            assert torch.equal(lin(xs[name][i]), alone[name][i]), (name, i)
    assert not torch.equal(alone["a"][0], alone["b"][0])
    fused.remove()


@pytest.mark.parametrize("coverage", ["method", "peft", "none"])
def test_coverage_policies_with_conv_loras(coverage):
    """Conv LoRAs (proj_in / proj_out) and a single-adapter layer (to_out.0) follow the policy."""
    pipe = conv_pair()
    embeds = _embeds(pipe)
    for method in ("klora", "kl"):
        with accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", coverage=coverage) as h:
            check_server_pattern(pipe, embeds, rounds=1)
        assert h.summary()["unpatched"]


def test_schedulers_scales_and_images_per_prompt(shared):
    """Requests that differ in scheduler, per-call LoRA scale and num_images_per_prompt."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    pipe, embeds = shared
    requests = [(2, 0, {"cross_attention_kwargs": {"scale": 0.5}}), (3, 1, {"num_images_per_prompt": 2}),
                (2, 2, {}), (3, 3, {"cross_attention_kwargs": {"scale": 0.8}})]
    schedulers = [EulerDiscreteScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]
    for method, weights in (("klora", "inplace"), ("kl", "scratch")):
        with accelerate_fusion(pipe, "sbj", "sty", method, backend="torch", weights=weights):
            check_server_pattern(pipe, embeds, requests=requests, schedulers=schedulers, rounds=1)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_families_with_per_call_scales(family):
    """SD3 and FLUX transformers (prompt embeddings given): requests with their own LoRA scales
    (``joint_attention_kwargs``)."""
    pipe = make(family)
    scales = (0.5, 1.0, 0.8)

    def request(p, steps, seed, scale):
        kw = run_kwargs(family, steps, joint_attention_kwargs={"scale": scale})
        kw["generator"] = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return p(**kw).images

    for method in ("klora", "kl"):
        with accelerate_fusion(pipe, "sbj", "sty", method, backend="torch"):
            alone = [request(request_pipe(pipe), 1 + i % 2, i, sc) for i, sc in enumerate(scales)]
            pipes = [request_pipe(pipe) for _ in scales]
            together = in_threads([lambda i=i, p=p, sc=sc: request(p, 1 + i % 2, i, sc)
                                   for i, (p, sc) in enumerate(zip(pipes, scales))])
        for a, b in zip(alone, together):
            assert torch.equal(a, b), (a - b).abs().max().item()


def test_two_installations_alternately_and_in_two_threads():
    """Two pipelines, each with its own installation, used alternately and from two threads."""
    pipes = [make("sd15"), make("sd15", r_sbj=8, r_sty=4)]
    embeds = [_embeds(p) for p in pipes]
    handles = [accelerate_fusion(p, "sbj", "sty", m, backend="torch") for p, m in zip(pipes, ("klora", "kl"))]
    try:
        alone = [generate(p, e, 2, 0) for p, e in zip(pipes, embeds)]
        alternately = [generate(p, e, 2, 0) for p, e in zip(pipes, embeds)]
        together = in_threads([lambda p=p, e=e: generate(p, e, 2, 0) for p, e in zip(pipes, embeds)])
    finally:
        for h in handles:
            h.remove()
    for a, b, c in zip(alone, alternately, together):
        assert torch.equal(a, b) and torch.equal(a, c)


def _hold_denoiser(pipe, inside: threading.Event, seconds: float = 0.5):
    """A hook that keeps the first denoiser call of ``pipe``'s UNet busy for ``seconds`` (inside the
    installation's lock), so that a second thread's call finds the lock taken."""
    done = []

    def hook(module, args):
        if not done:
            done.append(True)
            inside.set()
            time.sleep(seconds)

    return pipe.unet.mid_block.register_forward_pre_hook(hook)


def _user_loop(pipe, embeds, steps=2):
    """The user's own sampling loop on the shared pipeline's scheduler (no pipeline call)."""
    pos, neg = embeds
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            pipe.unet(latents, t, encoder_hidden_states=torch.cat([neg, pos]))
    return latents


def test_runs_that_cannot_be_told_apart_raise(shared):
    """A call whose run cannot be told apart from another thread's: the user's own loop (no pipeline
    call found) waiting for another thread's denoiser call; two requests on one scheduler."""
    pipe, embeds = shared
    with accelerate_fusion(pipe, "sbj", "sty", "klora", backend="torch"):
        inside = threading.Event()
        hold = _hold_denoiser(pipe, inside)
        try:
            def second():
                inside.wait()
                _user_loop(pipe, embeds)

            with pytest.raises(RuntimeError, match="cannot be told apart.*own loop"):
                in_threads([lambda: _user_loop(pipe, embeds), second])
        finally:
            hold.remove()

        # two requests on one scheduler: the second's set_timesteps takes the first's run over
        one, other = request_pipe(pipe), request_pipe(pipe)
        other.scheduler = one.scheduler

        def meanwhile(p, i, t, kwargs):  # after the first step: another request runs in another thread
            if i == 0:
                in_threads([lambda: generate(other, embeds, 2, 1)])
            return kwargs

        with pytest.raises(RuntimeError, match="cannot be told apart.*share one scheduler"):
            generate(one, embeds, 2, 0, callback_on_step_end=meanwhile)
        # the installation still works: the lock was given back after the errors
        check_server_pattern(pipe, embeds, requests=REQUESTS[:2], rounds=1)


def test_module_fusion_steps_from_two_threads_raise():
    lin = torch.nn.Linear(8, 8)
    g = torch.Generator().manual_seed(0)
    lora = lambda r: (torch.randn(r, 8, generator=g), torch.randn(8, r, generator=g), 1.0)  # noqa: E731
    fused = fuse_modules([lin], subjects=[lora(2)], styles=[lora(4)], method="klora", backend="torch")
    fused.step(0.0)
    with pytest.raises(RuntimeError, match="one sampling loop at a time"):
        in_threads([lambda: fused.step(0.5)])
    fused.new_run()
    in_threads([lambda: fused.step(0.5)])  # a new run may be stepped from another thread
    fused.remove()


def test_run_table_is_bounded_and_a_dropped_run_raises():
    table = RunTable(size=2)
    markers = [torch.arange(3) for _ in range(3)]
    runs = [SamplingRun(m) for m in markers]
    for run in runs:
        table.add(run)
    assert len(table) == 2 and table.get(markers[2]) is runs[2] and table.get(torch.arange(3)) is None
    assert table.find(markers[0]) is None  # dropped: find() says so, get() raises
    with pytest.raises(RuntimeError, match="more than 2 other runs"):
        table.get(markers[0])
