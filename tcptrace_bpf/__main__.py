from tcptrace_bpf.cli import cli

cli()
