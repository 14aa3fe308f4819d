"""``ztgpu``: the suite's command line for admins, researchers and auditors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ztgpu.errors import UsageError, ZtgpuError


def _cmd_config_check(args: argparse.Namespace) -> int:
    from ztgpu.config import config_path, dump_effective, load_config
    from ztgpu.noded.checks import agent_checks

    file = args.file or args.config
    config = load_config(file)
    path = config_path(file)
    if path.exists():
        print(f"# {path}: OK", file=sys.stderr)
    else:
        print(f"# {path}: no such file; showing the built-in defaults", file=sys.stderr)
    print(dump_effective(config), end="")
    if args.no_agent_checks:
        return 0
    # What ztgpu-noded checks at start, checked here the same way.
    failed = 0
    for check in agent_checks(config):
        if check.problem is None:
            print(f"# ok    {check.name}: {check.note}", file=sys.stderr)
        else:
            failed += 1
            print(f"# FAIL  {check.name}: {check.problem}", file=sys.stderr)
    if failed:
        print(f"# {failed} check(s) the node agent makes failed: it would refuse to start or "
              "to grant GPUs with this configuration on this host", file=sys.stderr)
        return 1
    return 0


def _cmd_install_check(args: argparse.Namespace) -> int:
    """Are the hooks in slurm.conf, run by slurmctld, and live on this node's slurmd?"""
    import os
    import time

    from ztgpu.audit.spool import Spool
    from ztgpu.config import load_config
    from ztgpu.errors import SlurmError
    from ztgpu.slurm import install_check as ic
    from ztgpu.slurm.client import CliSlurmClient
    from ztgpu.slurm.conf import install, suite_changes
    from ztgpu.slurm.hooks_install import hook_path

    config = load_config(args.config)
    if args.slurm_conf is None:
        raise UsageError("install --check needs --slurm-conf")
    conf = Path(args.slurm_conf)
    hooks = {"Prolog": hook_path("prolog", config), "Epilog": hook_path("epilog", config),
             "TaskProlog": hook_path("task_prolog", config)}
    findings: list[ic.Finding] = []
    missing = [str(p) for p in hooks.values() if not os.access(p, os.X_OK)]
    findings.append(ic.Finding("hooks", f"missing or not executable: {', '.join(missing)}; "
                               "run ztgpu install" if missing else None,
                               f"in {config.paths.hooks_dir}"))
    written = install(conf, suite_changes(hooks["Prolog"], hooks["Epilog"],
                                          hooks["TaskProlog"]), dry_run=True)
    findings.append(ic.Finding("slurm.conf", f"{conf} does not name the suite's hooks yet: run "
                               f"ztgpu install --slurm-conf {conf}" if written.changed else None,
                               f"{conf} names the suite's hooks"))
    slurm = CliSlurmClient(config.slurm.bin_dir, conf, config.slurm.command_timeout_s)
    try:
        shown = ic.show_config(slurm)
        findings += ic.controller_findings(shown, {k: str(v) for k, v in hooks.items()},
                                           ("Alloc", "Contain"))
    except SlurmError as exc:
        findings.append(ic.Finding("slurmctld", f"cannot ask slurmctld: {exc}"))
    if args.no_probe_job:
        findings.append(ic.Finding("slurmd", None, "not checked (--no-probe-job)"))
    elif any(f.problem for f in findings):
        findings.append(ic.Finding("slurmd", None, "no probe job: fix the above first"))
    else:
        try:
            job, ended = ic.probe_job(slurm, config.node_name)
            spool_path = config.paths.spool_dir / "events.db"
            codes: list[str] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with Spool.open(spool_path, config.node_name) as spool:
                    codes = [e["code"] for e in spool.read(job_id=job, limit=1000)]
                if "job.release" in codes:
                    break
                time.sleep(0.5)
            findings.append(ic.job_findings(job, ended, codes))
        except SlurmError as exc:
            findings.append(ic.Finding("slurmd", f"the probe job failed: {exc}"))
    for finding in findings:
        if finding.problem is None:
            print(f"ok    {finding.check}: {finding.detail}")
        else:
            print(f"FAIL  {finding.check}: {finding.problem}")
    return 1 if any(f.problem for f in findings) else 0


def _cmd_install_pam(args: argparse.Namespace) -> int:
    """``--pam SERVICE``: the module's loader (or pam_exec wrapper) and its stack lines."""
    from ztgpu.config import load_config
    from ztgpu.pam import install as pam_install
    from ztgpu.slurm.hooks_install import write_root_file
    from ztgpu.trust.safe_paths import require_trusted

    config = load_config(args.config)
    require_trusted(config.paths.hooks_dir, "paths.hooks_dir")
    kind, mfa = args.pam_module, args.pam_mfa
    lines = pam_install.stack_lines(config, kind=kind, options=args.pam_option, mfa=mfa)
    result = pam_install.plan(args.pam, Path(args.pam_dir), lines, mfa=mfa)
    for used in pam_install.kinds_used(kind, mfa):
        program = pam_install.module_path(config, used)
        if used == "exec":
            changed = write_root_file(program, pam_install.render_exec_wrapper(),
                                      dry_run=args.dry_run)
        elif used == "python":
            changed = write_root_file(program, pam_install.render_loader(),
                                      dry_run=args.dry_run, mode=0o644)
        else:
            changed = pam_install.build_compiled(program, dry_run=args.dry_run)
        _say_written(program, changed, args.dry_run)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not result.changed:
        print(f"unchanged: {result.path}")
        return 0
    print(result.diff(), end="")
    if args.dry_run:
        print(f"dry run: {result.path} not changed")
        return 0
    backup = pam_install.apply(result)
    print(f"updated: {result.path} (backup: {backup})")
    print("new logins use it at once; keep a root shell open until a test login works")
    return 0


def _say_written(path: Path, changed: bool, dry_run: bool) -> None:
    """One file `ztgpu install` wrote (the role's changed_when reads these words)."""
    verb = ("would write" if dry_run else "wrote") if changed else "unchanged"
    print(f"{verb}: {path}")


def _cmd_install_hooks_only(args: argparse.Namespace) -> int:
    """The hooks alone: for a node whose slurm.conf is shared or served by
    slurmctld (configless), which `ztgpu install --slurm-conf` updates on the
    controller."""
    if args.slurm_conf or args.pam or args.gate or args.cli_filter:
        raise UsageError("--hooks-only writes this node's hooks alone: drop --slurm-conf, "
                         "--pam, --gate and --cli-filter (run those separately)")
    from ztgpu.config import load_config
    from ztgpu.slurm.hooks_install import write_hooks
    from ztgpu.trust.safe_paths import require_trusted

    config = load_config(args.config)
    require_trusted(config.paths.hooks_dir, "paths.hooks_dir")
    for path, changed in write_hooks(config, dry_run=args.dry_run):
        _say_written(path, changed, args.dry_run)
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    if args.check:
        return _cmd_install_check(args)
    if args.hooks_only:
        return _cmd_install_hooks_only(args)
    if args.slurm_conf is None and args.pam is None:
        raise UsageError("install needs --slurm-conf (the Slurm hooks), --hooks-only (the "
                         "hooks, slurm.conf kept elsewhere) and/or --pam SERVICE (the PAM "
                         "module)")
    if args.pam is not None:
        status = _cmd_install_pam(args)
        if args.slurm_conf is None or status != 0:
            return status
    from ztgpu.config import load_config
    from ztgpu.slurm.conf import cli_filter_changes, gate_changes, install, suite_changes
    from ztgpu.slurm.hooks_install import (
        gate_path,
        hook_path,
        render_gate,
        write_cli_filter,
        write_gate,
        write_hooks,
    )
    from ztgpu.trust.safe_paths import require_trusted

    config = load_config(args.config)
    # Slurm runs these as root: nobody else may be able to replace them.
    require_trusted(config.paths.hooks_dir, "paths.hooks_dir")
    changes = suite_changes(hook_path("prolog", config), hook_path("epilog", config),
                            hook_path("task_prolog", config))
    if args.gate:
        # The job gate is opt-in; check its config before anything is written.
        render_gate(config, Path(args.slurm_conf))
        changes += gate_changes(gate_path(config))
    if args.cli_filter:
        changes += cli_filter_changes()
    # Plan first: a slurm.conf that cannot be read or changed safely stops
    # the install before any hook is written.
    result = install(Path(args.slurm_conf), changes, dry_run=True)
    written = write_hooks(config, dry_run=args.dry_run)
    if args.gate:
        written.append(write_gate(config, Path(args.slurm_conf), dry_run=args.dry_run))
    if args.cli_filter:
        written.append(write_cli_filter(Path(args.slurm_conf), args.cli_filter_config,
                                        dry_run=args.dry_run))
    for path, changed in written:
        _say_written(path, changed, args.dry_run)
    if not args.dry_run:
        result = install(Path(args.slurm_conf), changes, dry_run=False)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not result.changed:
        print(f"unchanged: {args.slurm_conf}")
        return 0
    print(result.diff, end="" if result.diff.endswith("\n") else "\n")
    if args.dry_run:
        print(f"dry run: {args.slurm_conf} not changed")
    else:
        print(f"updated: {args.slurm_conf} (backup: {result.backup})")
        print("restart slurmctld, then slurmd on every node: both must read this slurm.conf "
              "(a node whose controller still has the old one runs jobs without the hooks); "
              "then check with: ztgpu install --check --slurm-conf " + args.slurm_conf)
        _print_driver_advice(config)
        if args.gate:
            print("restart slurmctld for the job gate (PrologSlurmctld) to take effect")
    return 0


def _print_driver_advice(config: Any) -> None:
    """Say which modprobe.d line the agent will want, where a GPU driver is here."""
    from ztgpu.errors import Fault, GpuError
    from ztgpu.gpu.select import open_backend
    from ztgpu.noded.checks import driver_problem, rest_state

    try:
        backend = open_backend(config.gpu)
    except GpuError:
        return  # no GPUs on this host (a controller, say)
    try:
        problem = driver_problem(backend, rest_state(config))
    except Fault as exc:
        problem = str(exc)
    finally:
        backend.close()
    if problem:
        print(f"warning: ztgpu-noded will grant no GPU here until this is fixed: {problem}",
              file=sys.stderr)


def _cmd_status(args: argparse.Namespace) -> int:
    if not args.node:
        from ztgpu.cli.auth import mfa_status

        return mfa_status(args)
    from ztgpu.config import load_config
    from ztgpu.node_client import call

    config = load_config(args.config)
    status = call(str(config.paths.socket), "status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    kind = "SIMULATED" if status["simulated"] else status["backend"]
    print(f"node {status['node']}: {len(status['gpus'])} GPUs ({kind})")
    cgroups = status.get("cgroups", {})
    print(f"cgroups: {cgroups.get('mode', '?')} ({cgroups.get('detail', '')})")
    for reason in status.get("refusing_grants", []):
        print(f"REFUSING GRANTS: {reason}")
    for gpu in status["gpus"]:
        print(f"  gpu {gpu['index']}  /dev/nvidia{gpu['minor']}  {gpu['uuid']}")
    if not status["jobs"]:
        print("no jobs hold GPUs")
    for job in status["jobs"]:
        state = "VIOLATED" if job["violated"] else (
            "verified" if job["verified_cgroups"] else "pending")
        print(f"  job {job['job_id']}  user {job['user']}  gpus {job['gpus']}  "
              f"isolation {state}")
    _print_audit_status(status.get("audit", {}))
    return 0


def _print_audit_status(audit: dict[str, Any]) -> None:
    if not audit.get("forwarding"):
        print("audit: local spool only (audit.collector_url is not set)")
        return
    link = "connected" if audit.get("connected") else "NOT CONNECTED"
    print(f"audit: forwarding to {audit.get('url')} ({link})")
    age = audit.get("oldest_unacked_age_s")
    print(f"  spool: {audit.get('unacked')} unacknowledged of limit {audit.get('limit')} "
          f"(head seq {audit.get('head_seq')}, acknowledged {audit.get('acked_seq')})"
          + (f", oldest waiting {age:.0f}s" if isinstance(age, int | float) else ""))
    if audit.get("full"):
        print(f"  SPOOL FULL: no new GPU grants on this node (action "
              f"{audit.get('full_action')})")
    if audit.get("last_error"):
        print(f"  last error: {audit['last_error']}")


def _cmd_node_verify(args: argparse.Namespace) -> int:
    from ztgpu.config import load_config
    from ztgpu.node_client import call

    config = load_config(args.config)
    results = call(str(config.paths.socket), "verify", job_id=args.job, timeout=60)
    bad = [r for r in results if not r["ok"]]
    for r in results:
        print(f"job {r['job_id']} {r['cgroup']}: {'OK' if r['ok'] else 'VIOLATED'}")
        for layer in ("user", "cgroup_only"):
            print(f"    {layer:<11} " + " ".join(f"{k}={v}" for k, v in
                                                sorted(r.get(layer, {}).items())))
        for problem in r.get("problems", []):
            print(f"    {problem}")
    # A job the agent could not probe at all is not verified: say so and fail.
    status = call(str(config.paths.socket), "status")
    probed = {r["job_id"] for r in results}
    unverified = [j for j in status["jobs"]
                  if j["job_id"] not in probed and args.job in (None, j["job_id"])]
    for job in unverified:
        print(f"job {job['job_id']}: NOT VERIFIED: no process of {job['user']} in a cgroup "
              f"the agent confines (cgroups: {status.get('cgroups', {}).get('mode', '?')})")
    for reason in status.get("refusing_grants", []):
        print(f"node refuses grants: {reason}")
    if not results and not unverified:
        print("no running job processes to probe")
    return 1 if bad or unverified or status.get("refusing_grants") else 0


def _cmd_node_recover(args: argparse.Namespace) -> int:
    from ztgpu.config import load_config
    from ztgpu.node_client import call

    config = load_config(args.config)
    report = call(str(config.paths.socket), "recover", release_held=not args.keep_held,
                  timeout=120)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1
    for job_id in report["released_grants"]:
        print(f"released the GPUs of job {job_id} (it ended while the agent was down)")
    for item in report["drift"]:
        print(f"device file {item['path']}: {item['found']} -> {item.get('outcome', 'left')}")
    print(f"probed {report['probes']} job cgroup(s)")
    if not report["ok"]:
        for problem in report["problems"]:
            print(f"NOT SAFE: {problem}", file=sys.stderr)
        print(f"node {report['node']} left as it is; fix the above and run this again",
              file=sys.stderr)
        return 1
    if report["resumed"]:
        print(f"resumed node {report['node']} (was {report['was']}: {report['was_reason']})")
    else:
        print(f"node {report['node']} was not drained ({report['was']})")
    for job_id in report["released_jobs"]:
        print(f"released job {job_id} (held by Slurm after a failed launch)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ztgpu.cli.demo import run_demo

    code: int = run_demo(keep=args.keep)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ztgpu", description=__doc__)
    parser.add_argument("--config", help="config file (default: $ZTGPU_CONFIG or "
                        "/etc/ztgpu/ztgpu.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True)
    check = config.add_parser("check", help="validate and print the effective config")
    check.add_argument("file", nargs="?", help="file to check (default: the active config)")
    check.add_argument("--no-agent-checks", action="store_true",
                       help="validate the file only; skip the checks ztgpu-noded makes at "
                       "start on this host (users, groups, trusted paths, device files, "
                       "gres.conf order, driver parameters)")
    check.set_defaults(func=_cmd_config_check)

    inst = sub.add_parser("install", help="install the node hooks into slurm.conf")
    inst.add_argument("--slurm-conf", help="path of slurm.conf to update")
    inst.add_argument("--pam", metavar="SERVICE",
                      help="also (or only) put the ztgpu PAM module into this PAM service's "
                      "stack (sshd on compute nodes): account and session lines at its end")
    inst.add_argument("--pam-module", choices=("compiled", "python", "exec"),
                      default="compiled",
                      help="with --pam: the module's form: compiled (pam_ztgpu.so, built "
                      "here with gcc and libpam0g-dev; the default), python (pam_python; "
                      "also has the auth phase) or exec (pam_exec)")
    inst.add_argument("--pam-mfa", choices=("login", "jit"),
                      help="with --pam: TOTP in the auth phase (pam_python): 'login' on "
                      "login nodes (every login opens the user's MFA session; no compute "
                      "checks), 'jit' on compute nodes (just-in-time admin logins give a "
                      "code)")
    inst.add_argument("--pam-dir", default="/etc/pam.d", help=argparse.SUPPRESS)
    inst.add_argument("--pam-option", action="append", default=[], metavar="KEY=VALUE",
                      help="with --pam: a module option for the stack lines (break_glass=, "
                      "action_no_agent=, action_no_job=, action_adopt_failure=, "
                      "action_error=, timeout=, log=); repeatable")
    inst.add_argument("--hooks-only", action="store_true",
                      help="write this node's hooks and nothing else: where slurm.conf is "
                      "shared or served by slurmctld (configless), updated on the controller "
                      "with --slurm-conf")
    inst.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")
    inst.add_argument("--gate", action="store_true",
                      help="also install the job gate (PrologSlurmctld asking authd before a "
                      "GPU job starts; needs auth.authd_url, tls.cert, tls.key)")
    inst.add_argument("--cli-filter", action="store_true",
                      help="also install the submit-side cli_filter (Lua) that binds each "
                      "job to the MFA login session that submitted it (for authd's "
                      "mfa_binding: login_session); on login nodes and every submit host")
    inst.add_argument("--cli-filter-config", type=Path, metavar="FILE",
                      help="with --cli-filter: the ztgpu config the submitters' `ztgpu job "
                      "bind` reads (default: $ZTGPU_CONFIG or /etc/ztgpu/ztgpu.yaml)")
    inst.add_argument("--check", action="store_true",
                      help="change nothing; check that slurm.conf names the hooks, that "
                      "slurmctld runs them and (with one short 1-GPU probe job on this node) "
                      "that slurmd here does")
    inst.add_argument("--no-probe-job", action="store_true",
                      help="with --check: skip the probe job")
    inst.set_defaults(func=_cmd_install)

    from ztgpu.cli.pki import add_pki_parser
    add_pki_parser(sub)
    from ztgpu.cli.policy import add_policy_parser
    add_policy_parser(sub)
    from ztgpu.cli.auth import add_auth_parsers
    add_auth_parsers(sub)

    from ztgpu.cli.audit import add_audit_parser
    add_audit_parser(sub)

    status = sub.add_parser("status", help="your MFA session and jobs waiting for it; "
                            "with --node, what this node's agent enforces")
    status.add_argument("--node", action="store_true", help="ask this node's agent")
    status.add_argument("--authd", metavar="URL", help="authd URL (default: auth.authd_url)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)

    node = sub.add_parser("node", help="node agent operations").add_subparsers(
        dest="node_command", required=True)
    nverify = node.add_parser("verify", help="probe running jobs' GPU isolation now")
    nverify.add_argument("--job", help="only this job id")
    nverify.set_defaults(func=_cmd_node_verify)
    nrecover = node.add_parser(
        "recover", help="after an agent crash: release ended jobs' GPUs, check the node and, "
        "if it is safe, resume it in Slurm and release the jobs Slurm held")
    nrecover.add_argument("--keep-held", action="store_true",
                          help="leave jobs held after a failed launch as they are")
    nrecover.add_argument("--json", action="store_true")
    nrecover.set_defaults(func=_cmd_node_recover)

    from ztgpu.cli import assess, drill

    assess.add_parser(sub)
    drill.add_parser(sub)

    demo = sub.add_parser("demo", help="run the local demonstration cluster")
    demo.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ZtgpuError as exc:
        print(f"ztgpu: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
