"""The names of midol's commands, shared by the entry point and the parser's suggestions (a
table, no imports: :mod:`midol.cli` loads a tool by its module name when it runs)."""

# Subcommand -> module in midol.tools with ``main(argv) -> int``; imported only when used.
TOOLS: dict[str, str] = {"export": "midol.tools.cmd_export", "route": "midol.tools.cmd_route",
                         "analyze": "midol.tools.cmd_analyze", "shard": "midol.tools.cmd_shard",
                         "robustness": "midol.tools.cmd_robustness", "eval": "midol.tools.cmd_eval",
                         "predict": "midol.tools.cmd_predict", "embed": "midol.tools.cmd_embed",
                         "search": "midol.tools.cmd_search"}
