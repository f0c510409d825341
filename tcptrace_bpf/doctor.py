"""`tcptrace-bpf doctor`: the hook plan for this kernel and every problem with its fix."""

from __future__ import annotations

from typing import Optional

from rich.console import Console

from tcptrace_bpf.plan import TRACEPOINTS, KernelFacts, Plan, phase_modes


def render(facts: KernelFacts, plan: Plan, console: Console, loaded: Optional[str] = None) -> None:
    """`loaded`: the outcome of loading the plan for real (None when it was not tried)."""
    console.print(f"kernel {facts.release}; running as {'root' if facts.root else 'non-root'}")
    console.print(f"bcc: {'ok' if not facts.bcc_error else facts.bcc_error}")
    console.print(f"tracefs: {facts.tracefs or 'not mounted'}")
    console.print(f"BTF: {'/sys/kernel/btf/vmlinux' if facts.btf else 'missing (' + str(facts.btf_error) + ')'}")
    console.print(f"kprobes: {'available' if facts.kprobes else 'not available'}")
    console.print(f"fentry: {'trampolines present' if facts.trampolines else 'not available'}")
    modes = phase_modes(facts)
    console.print("timewait/keepalive hooks, best first: " + (", ".join(modes) or "none (inferred)")
                  + (f"; in use: {plan.phases}" if plan.phases else ""))
    console.print(f"headers: {facts.headers or 'missing'}")
    console.print("tracepoints: " + ", ".join(
        f"{name.split('/')[1]} {'yes' if name in facts.tracepoints else 'no'}" for name in TRACEPOINTS))
    if loaded is not None:
        console.print(f"load test: {loaded}")
    console.print("\n[bold]Hook plan[/] (fact: hook)")
    for fact, hook in plan.hooks.items():
        console.print(f"  {fact:15} {hook}")
    if plan.problems:
        console.print("\n[bold]Problems[/]")
        for problem in plan.problems:
            label = "[red]error[/]" if problem.fatal else "[yellow]warning[/]"
            console.print(f"  {label} {problem.what}\n      fix: {problem.fix}")
    else:
        console.print("\nno problems found")
