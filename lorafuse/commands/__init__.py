"""The command line's commands, one module per command (as diffusers' ``diffusers/commands/``).

Each module exposes ``add_parser(subparsers)`` (registers its subcommand, with ``main`` as the
parser default) and ``main(args) -> int`` (exit code). Modules import nothing heavy at module level:
torch, triton and diffusers are imported inside ``main``, after the arguments have been checked, so
``lorafuse --help`` and every ``lorafuse <command> --help`` answer at once.
"""
