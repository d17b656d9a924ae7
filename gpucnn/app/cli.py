"""The ``gpucnn`` command: train, eval, info, gradcheck, bench."""
import argparse
import json
import os
import platform
import signal
import sys

import numpy

import gpucnn
from .. import backend
from ..backends.cpu import threads
from . import parallel, runs, train as training
from .config import DEVICES, FIELDS as CONFIG_FIELDS
from ..errors import ConfigError, DeviceError, UserError
from ..validate import integer, positive_int

EPILOG = """examples:
  gpucnn train                                   # 8x8 digits, under a minute on a CPU
  gpucnn train --dataset fashion-mnist --epochs 3 --out runs/fashion
  gpucnn train --resume runs/fashion/checkpoint.npz --epochs 5
  gpucnn train --dataset fashion-mnist --model resnet --epochs 2   # the ResNet recipe
  gpucnn eval runs/fashion/checkpoint.npz
  gpucnn predict runs/fashion/checkpoint.npz shoe.png --top 3
  gpucnn export runs/fashion/checkpoint.npz fashion.onnx   # needs gpucnn[onnx]
  gpucnn info; gpucnn gradcheck --device cuda; gpucnn bench --device cpu
  mpiexec -n 4 gpucnn train --dataset fashion-mnist   # 4 ranks (GPUs), data parallel

Fashion-MNIST: apt-get install dataset-fashion-mnist (read from
/usr/share/datasets/fashion-mnist), or --data-dir DIR holding the IDX files.
MNIST: --data-dir DIR holding the four MNIST IDX files (gzipped or not).
The device is --device, else $GPUCNN_DEVICE, else auto (cuda where CuPy sees a GPU)."""


TRAIN_DESCRIPTION = (
    "Train a CNN with a progress bar (off a terminal, a progress line every 30 s), per-epoch "
    "metrics (OUT/metrics.jsonl), a checkpoint "
    "(OUT/checkpoint.npz) and plots (OUT/curves.png, OUT/confusion.png). Unset options take "
    "the dataset's defaults: digits 20 epochs, batch 32, adam lr 2e-3; fashion-mnist and mnist "
    "3 epochs, batch 64, adam lr 1e-3 with the LeNet; cifar10 and cifar100 10 epochs, batch "
    "128, sgd lr 1e-1 with the ResNet; folder 10 epochs, batch 32, adam lr 1e-3 with the "
    "LeNet. --model resnet takes its recipe: 10 "
    "epochs, batch 128, SGD momentum 0.9 Nesterov, lr 0.1 cosine to 0 per batch, weight decay "
    "5e-4, random crop (padding 2) + horizontal flip (crop only on digits and MNIST). "
    "Several GPUs or machines: start one process per GPU with the MPI launcher, mpiexec -n R "
    "gpucnn train ... (srun --mpi=pmix under Slurm; needs gpucnn[mpi]); each rank takes GPU "
    "(its rank on its node) mod (GPUs on the node), --batch-size is per rank (the global "
    "batch is R times it) and --lr is used as given; rank 0 alone prints and writes OUT.")
DEVICE_HELP = "default: $GPUCNN_DEVICE or auto"


def _parser():
    p = argparse.ArgumentParser(
        prog="gpucnn", description="Train and check convolutional networks whose "
        "backpropagation is written out by hand, on an NVIDIA GPU (CuPy) or the CPU (NumPy).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"gpucnn {gpucnn.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_train_parser, _eval_parser, _predict_parser, _export_parser, _info_parser,
                _gradcheck_parser, _tune_parser, _bench_parser):
        add(sub)
    return p


def _train_parser(sub):
    """train's options: one per Config field, as the field's metadata says
    (gpucnn.app.config.setting)."""
    t = sub.add_parser("train", help="train a CNN (default: scikit-learn's 8x8 digits)",
                       description=TRAIN_DESCRIPTION)
    for field in CONFIG_FIELDS:
        meta = field.metadata
        options = dict(meta["cli"])
        if "action" not in options:
            options["type"] = field.type
        t.add_argument(meta["flag"] or "--" + field.name.replace("_", "-"), dest=field.name,
                       help=meta["help"], **options)


def _eval_parser(sub):
    e = sub.add_parser("eval", help="evaluate a checkpoint on its dataset's test set")
    e.add_argument("checkpoint", help="a checkpoint.npz written by gpucnn train")
    e.add_argument("--data-dir", help="directory with the IDX files (default: the run's, else "
                   "the dataset's)")
    e.add_argument("--device", choices=DEVICES, help=DEVICE_HELP)
    e.add_argument("--batch-size", type=int, default=256,
                   help="test images per batch (default 256)")


def _predict_parser(sub):
    r = sub.add_parser("predict", help="classify images (PNG, JPEG) or .npy arrays with a "
                       "checkpoint", description="Print the most probable classes of each "
                       "image. Images are converted to grayscale, resized to the model's input, "
                       "inverted when their background is light and scaled with the "
                       "checkpoint's normalisation; .npy arrays hold uint8 pixels or floats in "
                       "[0, 1] of shape (H, W), (C, H, W), (N, H, W) or (N, C, H, W).")
    r.add_argument("checkpoint", help="a checkpoint.npz written by gpucnn train")
    r.add_argument("files", nargs="+", metavar="FILE", help="an image file or a .npy array")
    r.add_argument("--top", type=int, default=3, metavar="K", help="classes to show (default 3)")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")
    r.add_argument("--device", choices=DEVICES, help=DEVICE_HELP)


def _export_parser(sub):
    x = sub.add_parser("export", help="write a checkpoint's model as ONNX (needs gpucnn[onnx])",
                       description="Write the trained model of a checkpoint as an ONNX file "
                       "(opset 17, any batch size) that takes raw pixels: the training set's "
                       "normalisation is the graph's first nodes; the class names, the "
                       "normalisation and the input shape are in its metadata.")
    x.add_argument("checkpoint", help="a checkpoint.npz written by gpucnn train")
    x.add_argument("output", help="the ONNX file to write, e.g. model.onnx")


def cmd_export(args):
    from .. import onnx_export
    from . import inference
    model = inference.load(args.checkpoint, device="cpu")
    onnx_export.export(model, args.output)
    print(f"gpucnn: wrote {args.output} (ONNX opset {onnx_export.OPSET}, input (batch, "
          f"{', '.join(map(str, model.input_shape))}), {len(model.classes)} classes)")
    return 0


def _info_parser(sub):
    i = sub.add_parser("info", help="versions, the device found, whether the GPU kernels compile")
    i.add_argument("--kernels", action="store_true", help="instead, the static report of every "
                   "kernel compiled for sm_90 (H100), no GPU needed: registers, spills, shared "
                   "memory, occupancy, FFMA share of the SASS")


def _gradcheck_parser(sub):
    g = sub.add_parser("gradcheck", help="check every layer's backward against float64 "
                       "finite differences on a device")
    g.add_argument("--device", choices=DEVICES, help=DEVICE_HELP)
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")


def _tune_parser(sub):
    u = sub.add_parser("tune", help="time the convolution kernels' tile configurations on this "
                       "GPU and remember the fastest",
                       description="Time every tile configuration of the convolution kernels "
                       "on this GPU for the convolution shapes of a built-in model (or, with "
                       "--bench, of gpucnn.tools.bench's shapes) and cache the fastest per (GPU, "
                       "shape, dtype) in $XDG_CACHE_HOME/gpucnn/tune.json (else "
                       "~/.cache/gpucnn/tune.json); later runs on this GPU use them.")
    u.add_argument("--device", choices=DEVICES, help="must be a GPU (default cuda)")
    u.add_argument("--model", default="lenet", help="built-in model whose shapes to tune "
                   "(default lenet)")
    u.add_argument("--batch-size", type=int, help="default 64 for a model, the listed "
                   "batch sizes for --bench")
    u.add_argument("--bench", action="store_true", help="tune gpucnn.tools.bench's shapes instead")
    u.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="the kernels' precision (default float32)")
    u.add_argument("--repeat", type=int, default=5, help="timed launches per configuration")
    u.add_argument("--precision", metavar="LIST",
                   help="float32 conv precisions to tune, comma-separated (fp32, tf32, 3xtf32; "
                   "default all three; float64 has FP64 only)")


def _bench_parser(sub):
    b = sub.add_parser("bench", help="time gpucnn against PyTorch (python -m gpucnn.tools.bench)")
    b.add_argument("--device", choices=DEVICES, default="auto", help="default auto")
    b.add_argument("--repeat", type=int, default=10,
                   help="timed runs per case, of which the median counts (default 10)")
    b.add_argument("--json", help="also write the results as JSON to this file")
    b.add_argument("--smoke", action="store_true", help="one tiny case of each kind")
    b.add_argument("--modern", action="store_true",
                   help="only BN, a residual block, the ResNet stem pool and a resnet step")
    b.add_argument("--distributed", action="store_true",
                   help="under mpiexec -n R: data-parallel training steps (step time, share "
                   "of communication, overlap) against one process of the global batch")
    b.add_argument("--precision", nargs="?", const="fp32,tf32,3xtf32", metavar="LIST",
                   help="each float32 conv precision listed (default fp32,tf32,3xtf32) "
                   "against cuDNN with the matching TF32 setting, with its error against "
                   "float64, and the LeNet/ResNet steps at both libraries' defaults")


def cmd_train(args):
    config = training.Config(**{field.name: getattr(args, field.name) for field in CONFIG_FIELDS})
    threads.keep_freed_memory()  # this process is a training run
    world = parallel.world_for(config)
    try:
        training.train(config)
    except training.TrainingDiverged as e:
        _alone(world, e, 3)
        if not parallel.is_quiet(e):  # another rank's, rank 0 says it
            print(f"gpucnn: error: {e}", file=sys.stderr)
        return 3
    except runs.Terminated as e:
        _alone(world, e, 128 + 15)
        _ignore_repeats(world)
        return 128 + 15
    except KeyboardInterrupt as e:
        _alone(world, e, 130)
        _ignore_repeats(world)
        return 130
    except UserError as e:
        if parallel.is_quiet(e):
            return 2
        _alone(world, e, 2)
        raise
    except Exception as e:
        _alone(world, e, 1)
        raise
    return 0


def _ignore_repeats(world):
    """One rank of several stopped by an agreed signal, its checkpoint saved: the
    launcher may still forward the same SIGTERM (MPICH's mpiexec passes on every one),
    which would kill the rank inside MPI_Finalize, after Python has put back the
    default handlers, and turn its status into a death by signal. SIG_IGN survives
    that; SIGKILL and MPI_Abort still end the process."""
    if world.is_distributed:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _alone(world, error, code):
    """An error on one rank of several that the others did not reach with it: every
    rank ends now (MPI_Abort), not after the timeout."""
    if world.is_distributed and not parallel.is_agreed(error):
        parallel.end_world(world, error, code)


def cmd_eval(args):
    r = training.evaluate_checkpoint(args.checkpoint, args.data_dir, args.device,
                                     args.batch_size)
    print(f"{r['dataset']} test set after epoch {r['epoch']}: loss {r['test_loss']:.4f}, "
          f"accuracy {100 * r['test_accuracy']:.2f}%")
    for name, acc in zip(r["classes"], r["per_class"]):
        print(f"  {name:<12} {100 * acc:6.2f}%")
    return 0


def cmd_predict(args):
    from . import inference
    model = inference.load(args.checkpoint, device=args.device)
    positive_int(args.top, "--top", error=ConfigError)
    items = inference.read_inputs(args.files, model.input_shape, model.invert_light)
    probs = inference.probabilities(model, numpy.stack([x for _, x in items]))
    top = inference.top_classes(probs, model.classes, min(args.top, len(model.classes)))
    if args.json:
        print(json.dumps([dict(file=label, top=[dict(**{"class": name}, index=i, probability=p)
                                                 for name, i, p in best])
                          for (label, _), best in zip(items, top)], indent=1))
        return 0
    for (label, _), best in zip(items, top):
        print(f"{label}: " + ", ".join(f"{name} ({100 * p:.2f}%)" for name, _, p in best))
    return 0


def cmd_info(args):
    if args.kernels:
        from ..tools import kernel_report
        return kernel_report.main()
    print(f"gpucnn {gpucnn.__version__}, Python {platform.python_version()}, "
          f"NumPy {numpy.__version__}")
    device = _report_device()
    _report_distributed()
    ok = _compile_kernels()
    if device == "cuda":
        from ..backends import cuda
        loaded = cuda.kernels_for(backend.xp_for("cuda")).load_all()
        print(f"kernels: all {len(loaded)} instantiations loaded on the GPU through CuPy")
    return 0 if ok else 1


def _report_device():
    """Print CuPy's version and the device auto picks (and why); returns that device."""
    device, why = backend.resolve_device("auto")  # compiles and runs one tiny kernel first
    if device == "cuda":
        cp = backend.xp_for("cuda")
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
        print(f"CuPy {cp.__version__}")
        print(f"device: cuda ({why}; a test kernel compiled with NVRTC and ran)")
        print(f"GPU: {props['name'].decode()}, compute capability "
              f"{props['major']}.{props['minor']}")
        return device
    try:
        import cupy
        print(f"CuPy {cupy.__version__}")
    except ImportError:
        print("CuPy: not installed (pip install 'gpucnn[cuda12]' or 'gpucnn[cuda13]')")
    print(f"device: cpu ({why})")
    if why != "cpu requested (argument)":
        print(f"cuda: not usable: {backend.cuda_unavailable_reason()}")
    return device


def _report_distributed():
    """The MPI library (mpiexec -n R gpucnn train), this world's size, NCCL's version."""
    from .. import distributed
    try:
        version = distributed.mpi_library_version()
    except (RuntimeError, OSError) as e:  # mpi4py there, but no MPI library it can load
        version = f"not usable ({e})"
    if version is None:
        print("MPI: not available (mpi4py is not installed: pip install 'gpucnn[mpi]' and an "
              "MPI library)")
    else:
        import mpi4py
        print(f"MPI: {' '.join(version.split())} (mpi4py {mpi4py.__version__})")
    world = distributed.get_world()
    print(f"world: {world.size} rank{'s' if world.size > 1 else ''}" +
          ("" if world.is_distributed else " (not started by mpiexec or srun)"))
    nccl = distributed.nccl_version()
    print(f"NCCL: {nccl}" if nccl else "NCCL: not available (GPU ranks need it: CuPy with "
          "nvidia-nccl-cu12 or -cu13)")


def _compile_kernels():
    """Compile every kernel source with NVRTC (no GPU needed), in its first build (a
    file's tile configuration comes from its launcher), and print the outcome; False
    where one fails. `gpucnn info --kernels` compiles every build."""
    from ..backends import cuda
    from ..tools import nvrtc
    if nvrtc.library() is None:
        print("NVRTC: not found, so the kernels were not compiled here "
              "(pip install nvidia-cuda-nvrtc-cu12)")
        return True
    ok = True
    major, minor = nvrtc.version()
    first = {}
    for unit in cuda.compile_units():
        first.setdefault(unit.filename, unit)
    for filename, unit in sorted(first.items()):
        good, log, _ = nvrtc.compile(cuda.source(filename), unit.name_expressions,
                                     options=unit.options, filename=filename)
        ok &= good
        print(f"kernels/{filename}: {'compiles' if good else 'FAILS'} with NVRTC "
              f"{major}.{minor} (compute_90, build {unit.config})" + ("" if good else f"\n{log}"))
    return ok


def cmd_gradcheck(args):
    from ..tools import gradcheck
    integer(args.seed, "--seed", 0, error=ConfigError)
    device, why = backend.resolve_device(args.device)
    print(f"float64 finite-difference check of every backward on {device} ({why})")
    rows = gradcheck.run_all(device, args.seed)
    print(f"{'case':<32}{'max rel. error':>16}  result")
    for name, err, passed in rows:
        print(f"{name:<32}{err:>16.2e}  {'pass' if passed else 'FAIL'}")
    failed = sum(not p for _, _, p in rows)
    print(f"{len(rows) - failed} passed, {failed} failed (tolerance {gradcheck.TOLERANCE:g})")
    return 1 if failed else 0


def cmd_tune(args):
    from ..backends import cuda
    from ..tools import tune
    if args.bench:
        shapes = tune.bench_geometries(args.batch_size)
    else:
        batch = 64 if args.batch_size is None else args.batch_size
        shapes = tune.model_geometries(args.model, batch)
    precisions = _tune_precisions(args.precision, args.dtype)
    _tune_device(args.device)
    import cupy
    kernels = cuda.kernels_for(cupy)
    chosen = tune.tune(kernels, shapes, (numpy.dtype(args.dtype),), args.repeat,
                       precisions=precisions)
    print(f"gpucnn: {len(chosen)} choices for {kernels.device_name} saved in {tune.cache_path()}")
    return 0


def _tune_precisions(asked, dtype):
    """The precisions --precision lists; a tensor-core one for float64 is an error."""
    from ..backends.precision import PRECISIONS, TENSOR_CORE
    if asked is None:
        return ["fp32"] if dtype == "float64" else list(PRECISIONS)
    which = [p.strip() for p in asked.split(",") if p.strip()]
    bad = [p for p in which if p not in PRECISIONS]
    if bad or not which:
        raise ConfigError(f"--precision takes a comma-separated list of {', '.join(PRECISIONS)}, "
                          f"got {asked!r}")
    if dtype == "float64" and any(p in TENSOR_CORE for p in which):
        raise ConfigError(f"--precision {asked} with --dtype float64: float64 convolutions "
                          "compute in FP64 only; leave --precision out or pass fp32")
    return which


def _tune_device(asked):
    """tune's device: a GPU, by default cuda; the line for none says what was asked."""
    if asked == "cpu":
        raise ConfigError("--device cpu: gpucnn tune times kernels on a GPU; pass --device cuda "
                          "(the default) on a machine with one")
    if asked is None and not backend.cuda_available():
        raise DeviceError("gpucnn tune times kernels on a GPU (device cuda, its default), and "
                          f"there is none here: {backend.cuda_unavailable_reason()}")
    device, why = backend.resolve_device(asked or "cuda")
    if device != "cuda":
        raise DeviceError(f"gpucnn tune times kernels on a GPU, and there is none here ({why})")


def cmd_bench(args):
    from ..tools import bench, bench_precision
    positive_int(args.repeat, "--repeat", error=ConfigError)
    common = (["--device", args.device, "--repeat", str(args.repeat)] +
              (["--json", args.json] if args.json else []) + (["--smoke"] if args.smoke else []))
    if args.precision:
        if args.modern or args.distributed:
            raise ConfigError("--precision times its own cases; leave --modern and "
                              "--distributed out")
        return bench_precision.main(common + [f"--precision={args.precision}"]) or 0
    return bench.main(common + (["--modern"] if args.modern else []) +
                      (["--distributed"] if args.distributed else [])) or 0


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export, "info": cmd_info,
               "gradcheck": cmd_gradcheck, "bench": cmd_bench, "tune": cmd_tune}[args.command]
    try:
        rc = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return rc
    except UserError as e:  # anything else is a bug and keeps its traceback
        print(f"gpucnn: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `gpucnn ... | head`: the reader left. Point stdout at /dev/null so that
        # Python's flush at exit does not fail again (Python's documented recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("gpucnn: error: the output pipe was closed before all output was written",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
