"""Every transform the worker applies on a GPU, run on a CPU with the tiny pipeline: they fail the same way
without a GPU (the channels_last call that crashed the first H100 start raises here too)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from producer.contract import JobParams
from worker.decode import ChunkedDecoder, OutOfMemory
from worker.pipeline import Renderer, RunAhead, load_renderer, tune_options
from worker.settings import WorkerSettings
from worker.tiny_model import build_tiny_pipeline, make_tiny_model
from worker.tuning import (
    COMPILE_REGIONS,
    SplitFeedForward,
    TuneOptions,
    attention_first,
    attention_shapes,
    compile_seconds,
    compiler_stance,
    conv2d_channels_last,
    pick_attention,
    set_forward_chunking,
    split_vae_precision,
    time_attention,
    tune,
)
from worker.video import start_video

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
PARAMS = JobParams(width=64, height=64, num_frames=4, num_inference_steps=2)


def tiny(dtype: torch.dtype = torch.float32) -> Any:
    pipe = build_tiny_pipeline()
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe: Any, dtype: torch.dtype = torch.float32, attention: str = "default") -> torch.Tensor:
    renderer = Renderer(pipe=pipe, device=CPU, dtype=dtype)
    renderer.tuned.attention = attention
    return renderer.denoise(Image.new("RGB", (64, 64), (90, 160, 30)), PARAMS, seed=3, on_step=lambda d, t: None)


def test_channels_last_on_the_whole_unet_raises_and_per_conv2d_does_not_change_the_output() -> None:
    pipe = tiny()
    with pytest.raises(RuntimeError, match="rank 4"):  # the temporal Conv3d weights: what crashed on the H100
        pipe.unet.to(memory_format=torch.channels_last)
    pipe = tiny()
    before = latents(pipe)
    assert conv2d_channels_last(pipe.unet) == sum(isinstance(m, torch.nn.Conv2d) for m in pipe.unet.modules())
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(latents(pipe), before, rtol=1e-3, atol=1e-3)


def test_vae_split_keeps_the_encoder_in_fp32_and_renders_in_half_precision() -> None:
    pipe = tiny(torch.float16)
    assert split_vae_precision(pipe)
    assert pipe.vae.encoder.conv_in.weight.dtype == torch.float32
    assert pipe.vae.decoder.conv_in.weight.dtype == torch.float16
    assert not split_vae_precision(pipe)  # once: the pipeline now reads the VAE as fp32 and casts nothing
    assert latents(pipe, torch.float16).dtype == torch.float16


def test_split_feed_forward_goes_on_and_off_and_keeps_the_output() -> None:
    pipe = tiny()
    before = latents(pipe)
    blocks = [m for m in pipe.unet.modules() if hasattr(m, "set_chunk_feed_forward")]
    feed_forwards = sum(hasattr(b, "ff") + hasattr(b, "ff_in") for b in blocks)
    assert set_forward_chunking(pipe.unet, True) == feed_forwards == 18
    assert all(isinstance(b.ff, SplitFeedForward) for b in blocks)
    assert set_forward_chunking(pipe.unet, True) == 0  # not twice
    torch.testing.assert_close(latents(pipe), before, rtol=1e-3, atol=1e-3)
    assert set_forward_chunking(pipe.unet, False) == 18
    assert not any(isinstance(m, SplitFeedForward) for m in pipe.unet.modules())


def test_split_feed_forward_takes_batches_that_do_not_divide() -> None:
    ff = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(13, 5, 4)  # 13 rows in 8 parts: diffusers' chunking demands divisibility
    torch.testing.assert_close(SplitFeedForward(ff, 8)(x), ff(x))


def test_attention_choice_and_every_preferred_kernel_render() -> None:
    pipe = tiny()
    shapes = attention_shapes(pipe.unet, 64, 64, 4, int(pipe.vae_scale_factor))
    assert shapes == [(8, 8, 256, 4), (512, 8, 4, 4)]  # 32 channels / 8 heads; 16x16 latent tokens; CFG's 2x
    assert pick_attention("auto", shapes, CPU, torch.float32) == ("default", {})  # nothing to choose on a CPU
    assert pick_attention("cudnn", shapes, CPU, torch.float32) == ("cudnn", {})
    with pytest.raises(ValueError, match="SVDQ_ATTENTION"):
        pick_attention("fastest", shapes, CPU, torch.float32)
    assert time_attention("math", shapes, CPU, torch.float32, repeat=1) is not None
    assert time_attention("cudnn", shapes, CPU, torch.float32, repeat=1) is None  # no such kernel here
    expected = latents(pipe)
    for name in ("flash", "cudnn", "efficient", "math"):  # first choice where it runs, PyTorch's order elsewhere
        with attention_first(name):
            pass
        torch.testing.assert_close(latents(pipe, attention=name), expected, rtol=1e-3, atol=1e-3)


def test_every_transform_together_in_fp16_through_the_render_path() -> None:
    """Regional compile (traced by Dynamo; aot_eager instead of Inductor to keep it quick), attention preference,
    forward chunking and the VAE split at once, then a whole video through worker.video as a job renders it."""
    pipe = tiny(torch.float16)
    options = TuneOptions(compile=True, compile_backend="aot_eager", attention="flash", low_vram=True)
    renderer = Renderer(pipe=pipe, device=CPU, dtype=torch.float16)
    renderer.tuned = tune(pipe, CPU, torch.float16, options, attention_shapes(pipe.unet, 64, 64, 4, 4))
    regions = [m for m in pipe.unet.modules() if type(m).__name__ in COMPILE_REGIONS]
    assert renderer.tuned.compiled_regions == len(regions) == 18
    assert renderer.tuned.vae_split and renderer.tuned.low_vram and renderer.tuned.attention == "flash"
    assert renderer.needs_compile(PARAMS)
    timings: dict[str, float] = {}
    memory: dict[str, Any] = {}
    stages: list[str] = []
    pending = start_video(
        renderer,
        Image.new("RGB", (64, 64)),
        PARAMS,
        0,
        WorkerSettings(),
        timings=timings,
        memory=memory,
        progress=lambda stage, *a, **k: stages.append(stage),
    )
    video = pending.finish()
    assert video.frames == 4 and video.data[4:8] == b"ftyp"
    assert stages[0] == "compile" and "denoise" in stages  # a first shape compiles first, and says so
    assert timings["compile"] > 0 and timings["denoise"] >= 0
    assert memory["forward_chunking"] is True
    assert not renderer.needs_compile(PARAMS)


def test_compile_defaults_to_cuda_only_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SVDQ_COMPILE", "SVDQ_COMPILE_VAE"):  # the defaults, whatever the environment says
        monkeypatch.delenv(name, raising=False)
    assert tune_options(WorkerSettings(), torch.device("cuda")).compile is True
    assert tune_options(WorkerSettings(), torch.device("cuda")).compile_vae is True  # follows the UNet's
    assert tune_options(WorkerSettings(), CPU).compile is False
    assert tune_options(WorkerSettings(), CPU).compile_vae is False
    monkeypatch.setenv("SVDQ_COMPILE_VAE", "0")
    assert tune_options(WorkerSettings(), torch.device("cuda")).compile_vae is False
    monkeypatch.setenv("SVDQ_COMPILE", "0")
    monkeypatch.delenv("SVDQ_COMPILE_VAE")
    assert tune_options(WorkerSettings(), torch.device("cuda")).compile is False
    assert tune_options(WorkerSettings(), torch.device("cuda")).compile_vae is False
    monkeypatch.setenv("SVDQ_COMPILE", "1")
    assert tune_options(WorkerSettings(), CPU).compile is True


def test_the_vae_decoder_is_compiled_at_one_chunk_size_and_decodes_other_sizes_eagerly() -> None:
    """The compiled decoder (2.1x faster per frame on an H100) is built at warm-up for one chunk size; in a job
    that size runs the compiled code and any other (a tail chunk, a halving after out-of-memory, a request's own
    decode_chunk_size) runs eagerly: no job waits ~40 s for a compile. Same frames either way."""
    pipe = tiny()
    renderer = Renderer(pipe=pipe, device=CPU, dtype=torch.float32)
    renderer.tuned = tune(pipe, CPU, torch.float32, TuneOptions(compile_vae=True, compile_backend="aot_eager"), [])
    assert renderer.tuned.compiled_vae and "compiled VAE decoder" in renderer.tuned.describe()
    latent = torch.randn(1, 5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with compiler_stance("force_eager"):
        expected = torch.cat(list(ChunkedDecoder(pipe.vae, latent, 2)))
    renderer.compile_decode(64, 64, 2)
    renderer.compile_new_shapes = False  # the warm-up is over
    assert renderer.compiled_decode_chunks == {2}
    compiled = compile_seconds()
    decoded = torch.cat(list(ChunkedDecoder(pipe.vae, latent, 2, stance=renderer.decode_stance)))  # 2, 2, then 1
    assert compile_seconds() == compiled  # the tail chunk of 1 did not compile
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)
    with renderer.decode_stance():  # chunk 3: no code for it, so eager, not a compile
        pipe.vae.decode(latent[0, :3] / pipe.vae.config.scaling_factor, num_frames=3)
    assert compile_seconds() == compiled
    with compiler_stance("default"):  # while compiling is allowed, the tail would have compiled: the stance matters
        pipe.vae.decode(latent[0, :1] / pipe.vae.config.scaling_factor, num_frames=1)
    assert compile_seconds() > compiled


def test_the_worker_compiles_at_warm_up_only_and_runs_other_shapes_uncompiled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_renderer as the worker calls it, with compile forced on a CPU: the cache folder is configured, the
    warm-up shape and SVDQ_COMPILE_SHAPES are compiled, and a job at another shape never stalls on a compile."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # set by the load; restored after the test
        monkeypatch.setenv(name, str(tmp_path / "unused"))
    model = make_tiny_model(tmp_path / "tiny")
    settings = WorkerSettings(
        model=str(model),
        device="cpu",  # the same on a GPU host: what is checked is the policy, not the device
        compile=True,
        compile_backend="aot_eager",
        compile_cache_dir=str(tmp_path / "cache"),
        compile_shapes="64x64x3",
    )
    renderer = load_renderer(settings)
    assert renderer.tuned.compiled_regions == 18 and renderer.load_seconds > 0
    assert (tmp_path / "cache" / "inductor").is_dir()
    assert renderer.compiled_shapes == {(64, 64, 2, True), (64, 64, 3, True)}
    image = Image.new("RGB", (64, 64))

    def render(frames: int) -> dict[str, float]:
        timings: dict[str, float] = {}
        params = JobParams(width=64, height=64, num_frames=frames, num_inference_steps=2)
        start_video(renderer, image, params, 0, settings, timings=timings, memory={}).finish()
        return timings

    assert renderer.tuned.compiled_vae and renderer.compiled_decode_chunks == {2}  # the warm-up's chunk
    compiled = compile_seconds()
    assert "compile" not in render(4)  # not a compiled shape: eager, no compile
    assert compile_seconds() == compiled  # nor did its decode (a chunk of 4) compile
    assert renderer.compiled_shapes == {(64, 64, 2, True), (64, 64, 3, True)}
    assert "compile" not in render(3) and renderer.runs_compiled(JobParams(width=64, height=64, num_frames=3))
    with pytest.raises(ValueError, match="SVDQ_COMPILE_SHAPES"):
        load_renderer(WorkerSettings(model=str(model), device="cpu", compile=True, compile_shapes="64x64"))


def test_a_second_process_reuses_the_persistent_compile_cache(tmp_path: Path) -> None:
    """Inductor on a CPU, in two processes sharing SVDQ_COMPILE_CACHE_DIR: the second compiles from the cache.
    Told by Inductor's and AOTAutograd's cache counters, not by time: "warm < cold / 2" failed on an H100 host's
    16 busy cores (no traceback came back; a fast cold compile is the likely cause)."""
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        import torch
        from worker import compile_cache
        from torch._dynamo.utils import counters

        CACHES = (("inductor", "fxgraph_cache"), ("aot_autograd", "autograd_cache"))

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(8, 8)

            def forward(self, x):
                return torch.nn.functional.gelu(self.linear(x)) * 2

        directory = compile_cache.configure(Path(sys.argv[1]))
        loaded = compile_cache.load_artifacts(directory)
        block = Block()
        block.compile()
        with torch.inference_mode():
            block(torch.randn(2, 8))
        hits = sum(counters[kind][f"{cache}_hit"] for kind, cache in CACHES)
        misses = sum(counters[kind][f"{cache}_miss"] for kind, cache in CACHES)
        print(loaded, hits, misses, compile_cache.save_artifacts(directory))
    """)
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
            check=True,
        )
        loaded, hits, misses, size = out.stdout.split()
        runs.append((loaded == "True", int(hits), int(misses), int(size)))
    (cold_loaded, cold_hits, cold_misses, cold_size), (warm_loaded, warm_hits, warm_misses, _) = runs
    assert not cold_loaded and warm_loaded and cold_size > 0 and (tmp_path / "artifacts.bin").is_file()
    assert cold_hits == 0 < cold_misses and warm_misses == 0 < warm_hits, runs


def test_out_of_memory_retries_once_with_the_feed_forward_split_then_restores_it() -> None:
    """The OOM path toggles modules inside compiled regions: it must render the same and leave no split behind."""
    pipe = tiny()
    renderer = Renderer(pipe=pipe, device=CPU, dtype=torch.float32)
    renderer.tuned = tune(
        pipe,
        CPU,
        torch.float32,
        TuneOptions(compile=True, compile_backend="aot_eager"),
        attention_shapes(pipe.unet, 64, 64, 4, 4),
    )
    image = Image.new("RGB", (64, 64), (90, 160, 30))
    expected = renderer.denoise(image, PARAMS, seed=3, on_step=lambda d, t: None)
    renderer.compile_new_shapes = False  # as after a warm-up
    split_when_called: list[bool] = []
    forward = pipe.unet.forward

    def flaky(*args: Any, **kwargs: Any) -> Any:
        split_when_called.append(any(isinstance(m, SplitFeedForward) for m in pipe.unet.modules()))
        if len(split_when_called) == 1:
            raise OutOfMemory("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    pipe.unet.forward = flaky
    retried = renderer.denoise(image, PARAMS, seed=3, on_step=lambda d, t: None)
    assert split_when_called[:2] == [False, True] and renderer.forward_chunking
    assert not any(isinstance(m, SplitFeedForward) for m in pipe.unet.modules())
    torch.testing.assert_close(retried, expected, rtol=1e-3, atol=1e-3)


def test_a_checkpoint_between_unet_layers_stops_a_render_inside_its_first_step() -> None:
    """Cancel and hand-back need not wait for a step to end: a step at the caps takes seconds on a GPU."""

    class Stop(Exception):
        pass

    pipe = tiny()
    renderer = Renderer(pipe=pipe, device=CPU, dtype=torch.float32)
    calls: list[int] = []

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) == 3:  # at the first step's third layer (the checkpoints: each layer of the blocks)
            raise Stop

    synchronized: list[int] = []
    renderer.synchronize = lambda: synchronized.append(len(calls))  # type: ignore[method-assign]

    def render(progress: Any, checkpoint: Any = None) -> Any:
        settings = WorkerSettings()
        return start_video(
            renderer, Image.new("RGB", (64, 64)), PARAMS, 0, settings, timings={}, memory={}, progress=progress,
            checkpoint=checkpoint,
        )  # fmt: skip

    steps: list[int] = []
    pending = None
    with pytest.raises(Stop):
        pending = render(lambda stage, *a, **k: steps.append(k.get("step", 0)), checkpoint)
    assert pending is None and len(calls) == 3 and max(steps) == 0  # stopped before any step ended
    assert synchronized == [3]  # the stop waits for the device's queued work, so the next job finds it free

    def stop_at_the_first_step_end(stage: str, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("step"):
            raise Stop  # as Progress raises JobCanceled when a step's write finds the job canceled

    renderer.synchronize = lambda: synchronized.append(-1)  # type: ignore[method-assign]
    with pytest.raises(Stop):
        render(stop_at_the_first_step_end)
    assert synchronized == [3, -1]  # a stop at a step's end waits for the device too
    assert renderer.checkpoint is None  # the next job starts clean
    latents(pipe)  # and renders


def test_every_layer_is_a_checkpoint_in_eager_and_compiled_code_alike_without_recompiling() -> None:
    """A full-resolution block holds most of a step, so a render checks before every layer of the UNet's blocks:
    the tiny UNet's 18 (2 down, 1 mid and 2 up blocks). The layers are the compiled regions: a compiled shape
    checks at every layer too, and a job's checkpoint causes no recompile; nor does a shape that runs eagerly
    on a compiling worker skip them (Dynamo compiles a compiled module's hooks as frames of their own)."""
    image = Image.new("RGB", (64, 64))
    calls: list[int] = []

    def render(renderer: Renderer, params: JobParams = PARAMS) -> int:
        calls.clear()
        renderer.checkpoint = lambda: calls.append(1)
        try:
            renderer.denoise(image, params, seed=3, on_step=lambda d, t: None)
        finally:
            renderer.checkpoint = None
        return len(calls) // params.num_inference_steps

    pipe = tiny()
    replaced = Renderer(pipe=pipe, device=CPU, dtype=torch.float32)
    replaced.checkpoint = lambda: calls.append(-1)  # a pipeline serves its last renderer only: never called
    assert render(Renderer(pipe=pipe, device=CPU, dtype=torch.float32)) == 18 and -1 not in calls

    pipe = tiny()
    compiled = Renderer(pipe=pipe, device=CPU, dtype=torch.float32)
    compiled.tuned = tune(pipe, CPU, torch.float32, TuneOptions(compile=True, compile_backend="aot_eager"), [])
    compiled.denoise(image, PARAMS, seed=3, on_step=lambda d, t: None)  # the warm-up compiles, no checkpoint set
    before = compile_seconds()
    assert render(compiled) == 18 and compile_seconds() == before
    compiled.compile_new_shapes = False  # after the warm-up: another shape runs eagerly
    other = JobParams(width=64, height=64, num_frames=3, num_inference_steps=2)
    assert not compiled.runs_compiled(other)
    assert render(compiled, other) == 18 and compile_seconds() == before


def test_the_host_waits_for_the_device_only_when_it_is_more_than_depth_checkpoints_ahead() -> None:
    log: list[str] = []

    class Mark:  # a recorded CUDA event, as RunAhead's default makes them
        count = 0

        def __init__(self) -> None:
            Mark.count += 1
            self.name = f"e{Mark.count}"
            log.append(f"record {self.name}")

        def synchronize(self) -> None:
            log.append(f"wait {self.name}")

    run_ahead = RunAhead(torch.device("cuda"), depth=2, new_mark=Mark)
    for _ in range(4):
        run_ahead.mark()
    assert log == ["record e1", "record e2", "record e3", "wait e1", "record e4", "wait e2"]
    RunAhead(CPU).mark()  # nothing to wait for off CUDA (and no CUDA call)
