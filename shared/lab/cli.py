"""The ``splitllm`` command: sim, verify-split, memory (and the services, in their own packages)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.config.flags import add_model_flags, first_error, model_flag_values
from shared.config.heap import reuse_freed_memory
from shared.config.round import RoundConfig
from shared.errors import ClientError
from shared.config.threads import AUTOCAST_MODES, sleep_idle_threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class UsageError(ValueError):
    """Bad command-line input, reported as one line without a traceback."""


def _split_arg(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--split takes two integers 'a,b' (got '{text}'), e.g. --split 2,15") from None
    return a, b


def _list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _cuts_arg(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        cuts = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--cuts takes integers 'a1,a2,...' (got '{text}'), e.g. --cuts 0,3") from None
    if any(c < 0 for c in cuts):
        raise UsageError(f"--cuts must be >= 0 (got '{text}')")
    return cuts


def _lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    p.add_argument("--targets", default="", help="comma-separated target modules (default: per family)")


def _tokenizer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="", metavar="NAME_OR_DIR",
                   help="tokenizer for a model directory without one: a directory with tokenizer files, a bundled model, "
                        "or 'byte' (default: the model's own files, else a byte-level fallback)")


def _lora(args: argparse.Namespace) -> Any:
    from shared.model.adapters import LoraSettings

    targets = [t for t in args.targets.split(",") if t]
    return LoraSettings(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout, target_modules=targets)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_row(row: dict[str, Any]) -> None:
    quality = (f"acc {row['eval_accuracy']:.4f}" if "eval_accuracy" in row
               else f"ppl {row['eval_perplexity']:.2f}" if "eval_perplexity" in row else "")
    b = row["bytes"]
    print(f"{row['round']:>5}  {_fmt(row['train_loss'], '.4f'):>10}  {_fmt(row['eval_loss'], '.4f'):>9}  {quality:>13}  "
          f"{b['user']['up'] / 1e6:>9.2f}  {b['user']['down'] / 1e6:>9.2f}  {b['edge']['up'] / 1e6:>9.2f}  "
          f"{b['edge']['down'] / 1e6:>9.2f}  {row['seconds']:>7.1f}", flush=True)
    for task, m in sorted(row.get("tasks", {}).items()):  # a federation of several tasks: each one's own
        print(f"       {task}: eval_loss {m['eval_loss']:.4f}" + "".join(
            f", {k[5:]} {m[k]:.4f}" for k in ("eval_accuracy", "eval_perplexity") if k in m), flush=True)


def cmd_sim(args: argparse.Namespace) -> int:
    from shared.lab.sim import SimConfig, Simulation

    cfg = SimConfig(model=args.model, data=args.data, users=args.users, edges=args.edges, rounds=args.rounds,
                    split=_split_arg(args.split), round=RoundConfig(**model_flag_values(args, RoundConfig)),
                    max_len=args.max_len, partition=args.partition, alpha=args.dirichlet_alpha,
                    max_examples_per_client=args.max_examples or None, eval_examples_per_client=args.eval_examples,
                    lora=_lora(args), seed=args.seed, user_link=args.user_link, edge_link=args.edge_link, link_sleep=args.link_sleep,
                    user_edge_codecs=args.user_edge_codecs, edge_cloud_codecs=args.edge_cloud_codecs,
                    adapter=args.adapter, slowdowns=[float(x) for x in args.slowdowns.split(",") if x],
                    u_shaped=args.u_shaped, tokenizer=args.tokenizer,
                    user_models=_list(args.user_models), user_data=_list(args.user_data),
                    cuts=[int(x) for x in _list(args.cuts)], ranks=[int(x) for x in _list(args.ranks)],
                    memory_budgets=[int(x) for x in _list(args.memory_budgets)], block_ms=args.block_ms, autocast=args.autocast)
    sim = Simulation(cfg)
    print(f"model {args.model} ({sim.source.family.name}, {sim.source.num_layers} blocks), split {sim.spec.split[0]},"
          f"{sim.spec.split[1]}; data {args.data} ({sim.dataset.task}), {args.users} users, {args.edges} edges", flush=True)
    print(f"tokenizer: {sim.tokenizer.origin}", flush=True)
    if sim.dataset.task == "cls":
        print(f"majority-class accuracy on the eval splits: {sim.dataset.majority_class_accuracy():.4f}", flush=True)
    print(f"{'round':>5}  {'train_loss':>10}  {'eval_loss':>9}  {'quality':>13}  {'user_up_MB':>9}  {'user_dn_MB':>9}  "
          f"{'edge_up_MB':>9}  {'edge_dn_MB':>9}  {'seconds':>7}", flush=True)
    rows = sim.run(on_row=_print_row)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": cfg.to_dict(), "rounds": rows}, indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from shared.lab.verify import verify_split

    split = _split_arg(args.split)
    result = verify_split(args.model, split, args.steps, task=args.task, lr=args.lr, seed=args.seed,
                          u_shaped=args.u_shaped, tokenizer=args.tokenizer, cuts=_cuts_arg(args.cuts))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"{args.model} ({result.family}) split {split[0]},{split[1]}, {args.steps} steps, "
              f"{result.num_adapter_tensors} adapter tensors; tokenizer: {result.tokenizer}")
        for i, (a, b) in enumerate(zip(result.split_losses, result.whole_losses)):
            print(f"  step {i}: split loss {a:.8f}  whole loss {b:.8f}  diff {abs(a - b):.2e}")
        if args.cuts:
            print(f"users' device blocks {result.device_blocks}; weights compared with the mean of their whole runs")
        print(f"max loss difference   {result.max_loss_diff:.3e}")
        print(f"max weight difference {result.max_weight_diff:.3e}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from shared.lab.bench.timing import write_json
    from shared.lab.memory import memory_report, print_report

    if args.repeats < 1:
        raise SystemExit(f"splitllm memory: --repeats must be at least 1, got {args.repeats}")
    report = memory_report(args.model, _split_arg(args.split), batch_size=args.batch_size, seq_len=args.seq_len,
                           services=args.services, steps=args.steps, repeats=args.repeats)
    write_json(report, args.json)
    print_report(report)
    return 0


def cmd_bench_http(args: argparse.Namespace) -> int:
    from shared.lab.bench.overhead import bench_http, summary
    from shared.lab.bench.timing import write_json

    report = bench_http(args.model, args.split, args.batch_size, args.seq_len, args.steps, order=args.order)
    write_json(report, args.json)
    print(summary(report))
    return 0


def cmd_bench_codecs(args: argparse.Namespace) -> int:
    from shared.lab.bench.codecs import BENCH_CODECS, bench_codecs, bench_codecs_4g, passes_line
    from shared.lab.bench.timing import write_json

    report: dict[str, Any] = {"codecs": []}
    if not args.only_4g:
        # fp32 first: the reference every loss change is taken against
        codecs = ("fp32", *(c for c in args.codec if c != "fp32")) if args.codec else BENCH_CODECS
        report = bench_codecs(args.model, args.split, args.steps, args.batch_size, args.seq_len,
                              seeds=tuple(range(args.seed, args.seed + args.seeds)), codecs=codecs, data=args.data,
                              eval_examples=args.eval_examples, threads=args.threads)
        print(f"{report['model']} on {report['data']}, {report['steps']} steps of {report['batch']}, "
              f"{len(report['seeds'])} seed(s); loss change against fp32 from the same seed, mean +- standard error")
    print(f"{'codec':<44} {'bytes/step':>11} {'x fp32':>7} {'MB/s':>8} {'CPU MB/s':>8} {'loss':>8} {'delta %':>15}")
    for r in report["codecs"]:
        print(f"{r['codec']:<44} {r['bytes_per_step']:>11.0f} {r['ratio_vs_fp32']:>7.2f} {r['encode_decode_mb_s']:>8.0f} "
              f"{r['encode_decode_cpu_mb_s']:>8.0f} "
              f"{r['loss_after_steps']:>8.4f} {r['loss_delta_pct']:>+8.2f} +- {r['loss_delta_pct_se']:.2f}")
    if "passes" in report:
        print(passes_line(report["passes"]))
    if args.only_4g:
        report = {"round_4g": bench_codecs_4g(args.model, args.split, threads=args.threads)}
    elif not args.no_4g:
        report["round_4g"] = bench_codecs_4g(args.model, args.split, threads=args.threads)
    if "round_4g" in report:
        r4 = report["round_4g"]
        print(f"4g round, {r4['users']} users through one edge, {r4['steps']} steps of {r4['batch']}: "
              f"fp32 {r4['runs']['fp32']['round_seconds']:.1f} s, int8 {r4['runs']['int8']['round_seconds']:.1f} s "
              f"({r4['speedup_int8']:.2f}x), int8+shuffle-lz4 {r4['runs']['int8+shuffle-lz4']['round_seconds']:.1f} s "
              f"({r4['speedup_int8_shuffle_lz4']:.2f}x); CPU seconds of all processes: "
              + ", ".join(f"{spec} {run['cpu_seconds_total']:.1f}" for spec, run in r4["runs"].items()))
    write_json(report, args.json)
    return 0


def cmd_bench_memory_bodies(args: argparse.Namespace) -> int:
    from shared.lab.bench.bodies import MiB, bench_memory_bodies
    from shared.lab.bench.timing import write_json

    r = bench_memory_bodies(args.model, args.split, args.bodies, args.max_message_bytes, args.bursts, args.settle)
    write_json(r, args.json)
    print(f"edge ({r['model']}), {r['bodies']} concurrent step bodies of {r['body_bytes'] / MiB:.1f} MiB "
          f"({r['total_body_bytes'] / MiB:.0f} MiB in all); idle: RSS {r['idle']['rss'] / MiB:.0f} MiB, "
          f"anonymous {r['idle']['anon'] / MiB:.0f} MiB")
    for i, b in enumerate(r["bursts"]):
        print(f"  burst {i}: peak {b['peak_over_idle']:.2f}x the bodies, after {b['after_over_idle']:+.3f}x; "
              f"statuses {b['statuses']}")
    o, c = r["over_budget"], r["chunked_over_limit"]
    print(f"  {r['bodies'] + 1} at once: statuses {o['statuses']}, peak {o['peak_over_idle']:.2f}x the "
          f"{r['bodies']} bodies, after {o['after_over_idle']:.3f}x")
    print(f"  chunked body of 1.25x the limit: status {c['statuses']}, peak {c['peak_over_idle']:.2f}x the limit, "
          f"after {c['after_over_idle']:.3f}x")
    print(f"peak {r['peak_ratio']:.2f}x the bodies' total (target <= {r['target_peak_ratio']}), "
          f"after {r['after_ratio']:.3f}x")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitllm", description="Three-tier split LoRA fine-tuning runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sim", help="C users behind E edges for R rounds, in one process")
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--data", default="shakespeare", help="shakespeare, trec, sms_spam or sentiment")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--edges", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--split", default=None, help="split points a,b (default: max(1, L//15), L//2)")
    add_model_flags(p, RoundConfig, [n for n in RoundConfig.model_fields if n != "participants"])
    p.add_argument("--max-len", type=int, default=64, help="tokens per example (default 64)")
    p.add_argument("--partition", default="default", help="natural, dirichlet, iid (default: per data set)")
    p.add_argument("--dirichlet-alpha", type=float, default=0.5)
    p.add_argument("--max-examples", type=int, default=256, help="train examples per client (0: all)")
    p.add_argument("--eval-examples", type=int, default=32, help="held-out examples per client")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the per-round table as JSON to this path")
    p.add_argument("--user-link", default="none", help="link profile of each user-edge hop: wifi, 4g, 5g, fiber, none")
    p.add_argument("--edge-link", default="none", help="link profile of each edge-cloud hop")
    p.add_argument("--link-sleep", action="store_true", help="really wait the link time (default: a virtual clock)")
    p.add_argument("--user-edge-codecs", default="fp32",
                   help="codecs on user-edge hops: 'int8' (activations and gradients) or "
                        "'activations=int8,gradients=topk:ratio=0.1,uploads=fp16,downloads=fp32'")
    p.add_argument("--edge-cloud-codecs", default="fp32", help="codecs on edge-cloud hops (same form)")
    p.add_argument("--adapter", default="lora", choices=("lora", "svd"), help="adapter form (svd: what FedARA trains)")
    p.add_argument("--autocast", default="off", choices=AUTOCAST_MODES, help="every tier's mixed precision")
    p.add_argument("--slowdowns", default="", help="per-user compute slowdown factors, cycled, e.g. 1,2,4")
    p.add_argument("--block-ms", type=float, default=None,
                   help="a virtual clock: charge this many ms per block and training step on a 1x device (times its "
                        "slowdown), plus the emulated link time; default: the wall clock (slow devices sleep)")
    p.add_argument("--user-models", default="", help="a heterogeneous federation: each user's model, cycled "
                                                     "(a deployment per model), e.g. minilm-l6,smollm2-135m")
    p.add_argument("--user-data", default="", help="each user's task (data set), cycled, e.g. trec,sms_spam,sentiment")
    p.add_argument("--cuts", default="", help="the blocks each user declares it holds (its cut), cycled")
    p.add_argument("--memory-budgets", default="", help="or the parameter bytes each user declares, cycled")
    p.add_argument("--ranks", default="", help="each user's LoRA rank, cycled (a model's rank: its users' largest)")
    p.add_argument("--u-shaped", action="store_true",
                   help="labels never leave the device: the user holds the head and the loss (two requests a step)")
    _tokenizer_arg(p)
    _lora_args(p)
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("verify-split", help="K steps split and unsplit from the same seed; largest differences")
    p.add_argument("--model", required=True)
    p.add_argument("--split", required=True, help="split points a,b")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--task", choices=("lm", "cls"), default=None, help="default: lm, or cls for encoders")
    _tokenizer_arg(p)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--u-shaped", action="store_true", help="the U-shaped chain: the head and the loss on the user")
    p.add_argument("--cuts", default=None, help="the mixed case: one user per cut (the blocks it declares), e.g. 0,3")
    p.add_argument("--json", action="store_true", help='print {"max_loss_diff": ..., "max_weight_diff": ...}')
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("memory", help="each tier's parameter bytes and peak resident memory against the whole model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split", default="2,15")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--services", action="store_true",
                   help="also run a cloud, an edge and a user as service processes through one round; their peaks")
    p.add_argument("--steps", type=int, default=2, help="the services' round: its steps")
    p.add_argument("--repeats", type=int, default=3, help="each probe's runs, in a fresh process each: the median's")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_memory)

    bench = sub.add_parser("bench", help="benchmarks that write JSON").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("http", help="per-step time of the HTTP path on loopback against the in-process path")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split", default="2,15")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--order", default="IHHI", help="the rounds, in turn: I in-process, H over HTTP")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench_http)

    sub.add_parser("topology", help="the tiers in network namespaces joined by tc-shaped veth links (root)",
                   add_help=False)
    sub.add_parser("credentials", help="a deployment's key, tiers' credentials, revocation (see --help)", add_help=False)
    sub.add_parser("compose", help="the compose topology under Docker, built offline; runs a round (root)",
                   add_help=False)
    sub.add_parser("export", help="an adapter version as a PEFT adapter directory (see splitllm export --help)",
                   add_help=False)
    p = bench.add_parser("codecs", help="bytes, throughput and training effect of each tensor codec")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--split", default="1,3")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--data", default=None, help="default: trec for an encoder, shakespeare for a decoder")
    p.add_argument("--seeds", type=int, default=3, help="runs per codec, seeds --seed .. --seed + N - 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-examples", type=int, default=128, help="held-out examples the loss is taken on")
    p.add_argument("--codec", action="append", default=None,
                   help="a codec spec to compare (repeatable; fp32 is always run first); default: the standard set")
    p.add_argument("--no-4g", action="store_true", help="skip the round over emulated 4g links (real processes)")
    p.add_argument("--only-4g", action="store_true", help="only the round over emulated 4g links")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every tier in the 4g round and of the "
                   "speed measure (default 1: the round's 6 processes share the cores; 0: one per core in each)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench_codecs)

    p = bench.add_parser("memory-bodies", help="a real edge's resident memory under concurrent maximum-size bodies")
    p.add_argument("--model", default="tiny-bert")
    p.add_argument("--split", default="1,3")
    p.add_argument("--bodies", type=int, default=4, help="concurrent bodies per burst (default 4)")
    p.add_argument("--max-message-bytes", type=int, default=256 << 20, help="the edge's limit; bodies just under it")
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--settle", type=float, default=2.0, help="seconds after a burst before the after-release RSS")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench_memory_bodies)

    for name, text in SELF_PARSED.items():  # these parse their own flags: their --help is their own
        bench.add_parser(name, help=text, add_help=False)

    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} tier as a service (see splitllm {name} --help)", add_help=False)
    return parser


SERVICES = {"cloud": "cloud_server", "edge": "edge_server", "user": "user_agent"}
SELF_PARSED = {  # the benches that parse their own flags (see splitllm bench NAME --help)
    "fedara": "FedARA against fixed-rank LoRA", "droppeft": "DropPEFT against plain split LoRA",
    "devft": "DevFT against plain split LoRA", "h2tune": "H2Tune against local-only and naive heterogeneous LoRA",
    "pipeline": "one user's step with and without micro-batch pipelining over an emulated link",
    "scaling": "samples per second against the number of concurrent users through 2 edges",
    "compare": "centralised, federated and split LoRA side by side",
    "sessions": "one tier's sessions stepping at once against one after the other",
    "report": "the README's Performance section, generated from the benches' JSON files"}


def user_errors() -> tuple[type[BaseException], ...]:
    from shared.fl.aggregation import AggregationError
    from shared.data.datasets import DataError
    from shared.errors import ModelError
    from shared.lab.sim import RoundFailed

    return (UsageError, ClientError, ModelError, DataError, AggregationError, RoundFailed, json.JSONDecodeError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sleep_idle_threads()  # every splitllm process, in-process paths and services alike (before torch loads)
    if argv and argv[0] in SERVICES:  # the services parse their own flags (generated from their settings)
        import importlib

        return int(importlib.import_module(f"{SERVICES[argv[0]]}.__main__").main(argv[1:]) or 0)
    try:
        reuse_freed_memory()  # the other commands read SPLITLLM_HEAP (the services: their heap setting)
    except ValueError as exc:
        print(f"splitllm: error: {exc}", file=sys.stderr)
        return 2
    if argv[:1] == ["bench"] and argv[1:2] and argv[1] in SELF_PARSED:  # these benches parse their own flags
        import importlib

        return int(importlib.import_module(f"shared.lab.bench.{argv[1]}").main(argv[2:]) or 0)
    if argv and argv[0] in ("compose", "export", "credentials", "topology"):  # these parse their own flags
        import importlib

        return int(importlib.import_module(f"shared.lab.{argv[0]}").main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValidationError as exc:
        print(f"splitllm {args.command}: error: {first_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if isinstance(exc, user_errors()) or (isinstance(exc, ValueError) and type(exc) is ValueError):
            print(f"splitllm {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
