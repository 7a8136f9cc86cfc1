"""Whether a constraint admits any finite output: a JSON Schema whose required fields nest it
in itself forever, or a grammar rule with no way out (`start: "a" start`), would keep a
sequence generating until max_tokens. llguidance compiles such constraints without complaint,
so the gateway refuses them here, before any host is asked.

Both checks are the classic productivity analysis (a symbol is productive when some finite
string derives from it), computed as a fixed point. Anything they cannot read is assumed
productive: they refuse only what surely never ends.
"""

import re
from typing import Any

# --- JSON Schema ------------------------------------------------------------------------------

_MAX_DEPTH = 64


def json_schema_ends(root: Any) -> bool:
    """Whether some finite JSON value can satisfy the schema (local $refs followed)."""
    refs: dict[str, bool] = {}
    _collect_refs(root, refs, 0)
    changed = True
    while changed:  # each pass can only turn refs productive: at most len(refs) passes
        changed = False
        for ref, known in refs.items():
            if not known and _productive(_resolve(root, ref), refs, 0):
                refs[ref] = changed = True
    return _productive(root, refs, 0)


def _collect_refs(schema: Any, refs: dict[str, bool], depth: int) -> None:
    if depth > _MAX_DEPTH:
        return
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            refs.setdefault(ref, False)
        for value in schema.values():
            _collect_refs(value, refs, depth + 1)
    elif isinstance(schema, list):
        for value in schema:
            _collect_refs(value, refs, depth + 1)


def _resolve(root: Any, ref: str) -> Any:
    node = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return True  # a reference llguidance will report: not this check's to refuse
    return node


def _productive(schema: Any, refs: dict[str, bool], depth: int) -> bool:
    if depth > _MAX_DEPTH or not isinstance(schema, dict):
        return schema is not False
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#") and not refs.get(ref, True):
        return False
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            if not any(_productive(s, refs, depth + 1) for s in options):
                return False
    every = schema.get("allOf")
    if isinstance(every, list) and not all(_productive(s, refs, depth + 1) for s in every):
        return False
    if "const" in schema or "enum" in schema:
        return True
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if not isinstance(kinds, list) or any(k not in ("object", "array") for k in kinds):
        return True  # a string, number, boolean or null ends
    if "object" in kinds:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        names = required if isinstance(required, list) else []
        if all(_productive(properties.get(n, True), refs, depth + 1) for n in names):
            return True
    if "array" in kinds:
        least = schema.get("minItems", 0)
        items = schema.get("items", True)
        if not isinstance(least, int) or least <= 0:
            return True
        if _productive(items, refs, depth + 1):
            return True
    return False


# --- Lark -------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<skip>[ \t\r]+|//[^\n]*)
  | (?P<newline>\n)
  | (?P<string>"(?:\\.|[^"\\])*"i?)
  | (?P<regex>/(?:\\.|[^/\\\n])+/[imslux]*)
  | (?P<special><[^<>\s]+>)
  | (?P<repeat>\{\s*\d+\s*(?:,\s*\d*\s*)?\})
  | (?P<directive>%[a-z_]+)
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<arrow>->)
  | (?P<number>\d+)
  | (?P<op>[:|()\[\]?*+~.&{}=,!])
    """,
    re.VERBOSE,
)


class _Unreadable(Exception):
    pass


def lark_ends(text: str) -> bool:
    """Whether the grammar's `start` rule derives some finite string."""
    try:
        rules = _rules(text)
    except _Unreadable:
        return True
    if "start" not in rules:
        return True
    productive: dict[str, bool] = dict.fromkeys(rules, False)
    changed = True
    while changed:
        changed = False
        for name, body in rules.items():
            if not productive[name] and _alternatives_end(body, productive):
                productive[name] = changed = True
    return productive["start"]


def _rules(text: str) -> dict[str, list[Any]]:
    """Each lowercase rule's body as a parsed expression; terminals and directives skipped."""
    tokens: list[tuple[str, str]] = []
    at = 0
    while at < len(text):
        if text.startswith("%json", at):  # %json { ... }: an inline schema, a lexeme
            start = text.find("{", at)
            end = _balanced_end(text, start) if start >= 0 else -1
            if end < 0:
                raise _Unreadable
            tokens.append(("lexeme", ""))
            at = end
            continue
        match = _TOKEN.match(text, at)
        if match is None:
            raise _Unreadable
        kind = match.lastgroup or ""
        if kind != "skip":
            tokens.append((kind, match.group()))
        at = match.end()
    rules: dict[str, list[Any]] = {}
    # A definition: at a line's start, a name (rule attributes or priority allowed) and ':'.
    starts = [
        i
        for i, (kind, value) in enumerate(tokens)
        if kind == "name" and (i == 0 or tokens[i - 1][0] == "newline") and _defines(tokens, i)
    ]
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(tokens)
        name = tokens[start][1]
        colon = next(i for i in range(start, end) if tokens[i] == ("op", ":"))
        body = [t for t in tokens[colon + 1 : end] if t[0] != "newline"]
        if name[0].islower():
            parsed, rest = _expansions(body, 0)
            if rest != len(body):
                raise _Unreadable
            rules[name] = parsed
    return rules


def _defines(tokens: list[tuple[str, str]], i: int) -> bool:
    j = i + 1
    if j < len(tokens) and tokens[j] == ("op", "["):  # name[attributes]:
        while j < len(tokens) and tokens[j] != ("op", "]"):
            j += 1
        j += 1
    if j + 1 < len(tokens) and tokens[j] == ("op", ".") and tokens[j + 1][0] == "number":
        j += 2  # name.priority:
    return j < len(tokens) and tokens[j] == ("op", ":")


def _balanced_end(text: str, start: int) -> int:
    depth, i, quoted = 0, start, False
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


# An expression: ("alt", [sequence, ...]) with each sequence a list of (atom, optional) items;
# an atom is ("rule", name) or ("end",) (anything that matches some string) or a nested "alt".


def _expansions(tokens: list[tuple[str, str]], at: int) -> tuple[list[Any], int]:
    alternatives: list[list[Any]] = [[]]
    while at < len(tokens):
        kind, value = tokens[at]
        if value in (")", "]") and kind == "op":
            break
        if (kind, value) == ("op", "|"):
            alternatives.append([])
            at += 1
            continue
        if kind == "arrow":  # -> alias
            at += 2
            continue
        atom, at = _atom(tokens, at)
        optional = False
        while at < len(tokens):
            kind, value = tokens[at]
            if kind == "op" and value in "?*":
                optional, at = True, at + 1
            elif kind == "op" and value == "+":
                at += 1
            elif kind == "repeat":
                optional = optional or value.strip("{} ").split(",")[0].strip() == "0"
                at += 1
            elif kind == "op" and value == "~" and at + 1 < len(tokens):
                optional = optional or tokens[at + 1][1] == "0"
                at += 2
                if at + 1 < len(tokens) and tokens[at] == ("op", "."):
                    at += 3  # ~ n..m
            else:
                break
        alternatives[-1].append((atom, optional))
    return [("alt", alternatives)], at


def _atom(tokens: list[tuple[str, str]], at: int) -> tuple[Any, int]:
    kind, value = tokens[at]
    if kind == "op" and value in "([":
        inner, at = _expansions(tokens, at + 1)
        if at >= len(tokens) or tokens[at][1] != {"(": ")", "[": "]"}[value]:
            raise _Unreadable
        atom = ("optional",) if value == "[" else inner[0]
        return atom, at + 1
    if kind == "name":
        return (("rule", value) if value[0].islower() else ("end",)), at + 1
    if kind in ("string", "regex", "special", "lexeme"):
        return ("end",), at + 1
    raise _Unreadable


def _alternatives_end(body: list[Any], productive: dict[str, bool]) -> bool:
    (alt,) = body
    return _ends(alt, productive)


def _ends(atom: Any, productive: dict[str, bool]) -> bool:
    if atom[0] in ("end", "optional"):
        return True
    if atom[0] == "rule":
        return productive.get(atom[1], True)  # an undefined rule: llguidance's to report
    return any(
        all(optional or _ends(item, productive) for item, optional in sequence)
        for sequence in atom[1]
    )
