"""The Triton kernels compile for real GPUs: every launch variant of a covering subset, recorded
from the real launchers, compiled ahead of time for sm_80 and sm_90 on the CPU, with no compile
error, no register spill and no approximate division or square root outside the noise transform
(``make aot-full`` compiles every variant)."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_without_interpreter(args, cwd=REPO):
    """Run ``python args`` with TRITON_INTERPRET unset (real JITFunctions) and this checkout first."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_every_ci_variant_compiles_for_sm80_and_sm90_without_spills():
    done = run_without_interpreter(["-m", "tools.triton_aot", "--set", "ci", "--workers", "2"])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    assert " 0 failures" in done.stdout
    compiled = [line for line in done.stdout.splitlines() if line.startswith("ok")]
    assert any("sm_80" in line for line in compiled) and any("sm_90" in line for line in compiled)


def test_a_kernel_the_interpreter_accepts_but_the_compiler_rejects_is_reported(tmp_path):
    # A module-level annotated constant: the interpreter runs it, the GPU frontend raises NameError.
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent('''
        import torch
        import triton
        import triton.language as tl

        WIDTH: tl.constexpr = 4

        @triton.jit
        def kernel(out_ptr):
            tl.store(out_ptr + tl.arange(0, WIDTH), tl.zeros([WIDTH], tl.float32))

        def launch():
            kernel[(1,)](torch.empty(4))
    '''))
    (tmp_path / "check.py").write_text(textwrap.dedent('''
        import bad_kernel
        from tools import triton_aot
        [launch] = triton_aot.record(bad_kernel.kernel, bad_kernel.launch, "bad")
        print(triton_aot.compile_launch(launch, 90).error)
    '''))
    done = run_without_interpreter([str(tmp_path / "check.py")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "NameError" in done.stdout and "WIDTH" in done.stdout, done.stdout


# The step's module loaded from a copy whose AdamW update uses tl.sqrt and / (which compile to
# sqrt.approx.ftz.f32 and div.full.f32), under the real module's name so that the launcher uses it.
_APPROXIMATE_UPDATE = textwrap.dedent('''
    import importlib.util, pathlib, sys
    import torch
    import mergopt_kernels.ops
    from tools import triton_aot

    source = pathlib.Path(mergopt_kernels.ops.__file__).with_name("triton_step.py").read_text()
    for exact, approximate in (("tl.sqrt_rn(second_moment)", "tl.sqrt(second_moment)"),
                               ("tl.div_rn(exp_avg, denom)", "exp_avg / denom")):
        assert source.count(exact) == 1, exact
        source = source.replace(exact, approximate)
    pathlib.Path("triton_step.py").write_text(source)
    spec = importlib.util.spec_from_file_location("mergopt_kernels.ops.triton_step", "triton_step.py")
    module = sys.modules[spec.name] = mergopt_kernels.ops.triton_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for launch in triton_aot.step_launches(dict(dtype=torch.float32, noise="gaussian", mode="restore+apply")):
        if launch.kernel.endswith(":_fused_step_kernel"):
            print(launch.kwargs["FULL"], sorted(set(triton_aot.compile_launch(launch, 90).inexact)))
''')


def test_approximate_division_or_square_root_in_the_update_is_reported(tmp_path):
    (tmp_path / "check.py").write_text(_APPROXIMATE_UPDATE)
    done = run_without_interpreter([str(tmp_path / "check.py")], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout    # the full-block and the edge kernel
    for line in lines:
        found = line.split(" ", 1)[1]
        assert "div.full.f32 at triton_step.py:" in found and "sqrt.approx.ftz.f32 at triton_step.py:" in found, line
        assert "triton_noise" not in found, line


def test_the_noise_transform_may_use_approximate_square_roots():
    # The Gaussian transform's radius takes tl.sqrt (its error against float64 is measured in
    # test_noise.py): the check scopes it out, and only it.
    script = textwrap.dedent('''
        import torch, triton
        from tools import triton_aot
        launches = triton_aot.step_launches(dict(dtype=torch.float32, noise="gaussian", mode="restore+apply"))
        launch = next(l for l in launches if l.kwargs.get("FULL"))
        source, target, options = triton_aot.bind(launch, 90)
        ptx = triton.compile(source, target=target, options=options.__dict__).asm["ptx"]
        print(ptx.count("sqrt.approx"), ptx.count("sqrt.rn"), ptx.count("div.rn"), triton_aot.inexact_ops(ptx))
    ''')
    done = run_without_interpreter(["-c", script])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    approx, sqrt_rn, div_rn, inexact = done.stdout.split(" ", 3)
    assert int(approx) > 0 and int(sqrt_rn) > 0 and int(div_rn) > 0, done.stdout
    assert inexact.strip() == "[]", done.stdout
