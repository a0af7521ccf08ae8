"""Ansible's linear strategy run over Mitogen (the `mitogen` package, a `deploy` dependency).

Without it every task runs its module in a new interpreter, which imports Ansible's module
utilities afresh, compiling them from the module's zip each time: about 0.5 s of CPU per
module run, whatever the module does. Mitogen keeps one interpreter per machine for the
whole run and runs each module there. Opt-in: ANSIBLE_STRATEGY=mitogen_linear (the
README's knobs table says why it is not the default yet).
"""

from typing import Any

from ansible.collections.list import list_collection_dirs
from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule as MitogenLinear


class StrategyModule(MitogenLinear):
    def run(self, iterator: Any, play_context: Any) -> Any:
        # Mitogen lists every installed collection in each task's forked worker that runs a
        # collection's module, loading each collection's metadata (the `ansible` package has
        # 94); done once here, before the workers fork, they inherit it.
        list(list_collection_dirs())
        return super().run(iterator, play_context)
