"""IntEnum for this package without importing ``enum``.

Importing ``enum`` (with functools and collections behind it) and building the status codes
costs a short-lived process about 23M instructions: more than the whole codec.  Modules here
write ``class Code(IntEnum)`` against the real ``enum.IntEnum`` when type checking and this
class at run time.  It keeps what users of an IntEnum rely on: members are ints and class
attributes, ``Cls(value)`` finds a member (ValueError otherwise), ``Cls[name]``, iteration in
definition order, ``len``, ``in``, ``__members__``, ``.name``/``.value``, and the same
``repr``/``str``/``format``.  Members are the class's upper-case int attributes.  An IntFlag
declared this way has no composite members: ``a | b`` is a plain int.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

_MappingProxy = type(type.__dict__)


class _IntEnumType(type):
    _member_map_: dict[str, "IntEnum"]
    _value2member_map_: dict[int, "IntEnum"]

    def __iter__(cls) -> "Iterator[IntEnum]":
        return iter(list(cls._member_map_.values()))

    def __len__(cls) -> int:
        return len(cls._member_map_)

    def __contains__(cls, value: object) -> bool:
        return isinstance(value, cls) or value in cls._value2member_map_

    def __getitem__(cls, name: str) -> "IntEnum":
        return cls._member_map_[name]

    @property
    def __members__(cls) -> object:
        return _MappingProxy(dict(cls._member_map_))

    def __repr__(cls) -> str:
        return f"<enum {cls.__name__!r}>"


class IntEnum(int, metaclass=_IntEnumType):
    _name_: str

    def __init_subclass__(cls) -> None:
        cls._member_map_ = {}
        cls._value2member_map_ = {}
        for name, value in list(vars(cls).items()):
            if name.isupper() and not name.startswith("_") and type(value) is int:
                member = int.__new__(cls, value)
                member._name_ = name
                setattr(cls, name, member)
                cls._member_map_[name] = member
                cls._value2member_map_.setdefault(value, member)

    def __new__(cls, value: int) -> "IntEnum":
        try:
            return cls._value2member_map_[value]
        except (KeyError, TypeError):
            raise ValueError(f"{value!r} is not a valid {cls.__qualname__}") from None

    @property
    def name(self) -> str:
        return self._name_

    @property
    def value(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self._name_}: {int(self)}>"

    __str__ = int.__repr__  # as IntEnum: str() and format() give the number

    def __reduce_ex__(self, protocol: object) -> tuple[type, tuple[int]]:
        return type(self), (int(self),)


IntFlag = IntEnum
