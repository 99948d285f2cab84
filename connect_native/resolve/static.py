"""
:class:`StaticResolver`: fixed instances, for tests and for services whose
addresses are known without Consul.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from connect_native.resolve._base import Instance, IResolver

__all__ = ["StaticResolver"]


@implementer(IResolver)
class StaticResolver:
    """
    Always the same instances.

    :param instances: the instances (an empty sequence resolves to none).
    :param description: names them in errors.
    """

    def __init__(
        self, instances: Sequence[Instance], description: str | None = None
    ) -> None:
        instances = tuple(instances)
        for index, instance in enumerate(instances):
            if not isinstance(instance, Instance):
                raise TypeError(
                    f"instances[{index}] must be an Instance, not "
                    f"{type(instance).__name__}: {instance!r}"
                )
        self.instances: tuple[Instance, ...] = instances
        services = sorted({i.identity.service for i in instances})
        self.description = description or (
            f"static instances of {', '.join(repr(s) for s in services)}"
            if services
            else "an empty static resolver"
        )

    def resolve(self) -> Deferred[Sequence[Instance]]:
        return succeed(self.instances)

    def __repr__(self) -> str:
        return f"StaticResolver({list(self.instances)!r})"
