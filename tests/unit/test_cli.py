"""device/cli.py: the one parser names each handler as module:function; every name
must resolve, since none is imported until its command runs."""

from __future__ import annotations

import argparse

from hotplug.device import cli


def test_every_subcommand_names_a_handler_that_exists() -> None:
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) >= {"connect", "disconnect", "list", "run", "check", "status"}
    for name, command in sub.choices.items():
        handler = cli.handler_of(command.get_default("handler"))
        assert callable(handler), name


def test_a_bare_module_is_one_of_the_device_side() -> None:
    assert cli.handler_of("status:cmd_status").__module__ == "hotplug.device.status"
    assert cli.handler_of("hotplug.testing.vm.demo:cmd_demo").__name__ == "cmd_demo"
