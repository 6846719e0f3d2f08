"""The `scrape` Lua module (gluahttpscrape API) on the standard library's html.parser.

Every function returns `result, nil`. Results are plain Lua lists, so `#res`, `res[i]` and
`ipairs` work (the original's userdata only had `res()` iteration; `res[i]` out of range now
gives nil instead of raising). Matching does not descend into a node that matched, as in
yhat/scrape. Tags are compared by lower-cased name, so unlike Go an unknown tag name never
matches text nodes.

Bounds: the tree a document makes (a few hundred bytes of Python objects per tag) is estimated from
a count of its "<" and refused before parsing when it would not fit in what the script's memory cap
leaves; parsing and matching look at the call's clock as they go.
"""

from __future__ import annotations

from html.parser import HTMLParser

from msgscript import ArgError, check_integer, check_string
from msgscript import ticker
from msgscript_plugins.json import text_cost


NODE_COST = 700  # bytes of Python objects a tag (its Node, attributes, a text node beside it) takes, about

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track",
        "wbr", "keygen", "command", "basefont", "bgsound", "frame"}
HEAD_ONLY = {"title", "meta", "link", "style", "script", "base", "noscript", "template"}
# Starting one of these closes an open element of the listed names, stopping at the given boundaries.
IMPLIED_END = {
    "li": ({"li"}, {"ul", "ol"}),
    "dt": ({"dt", "dd"}, {"dl"}),
    "dd": ({"dt", "dd"}, {"dl"}),
    "tr": ({"tr", "td", "th"}, {"table", "thead", "tbody", "tfoot"}),
    "td": ({"td", "th"}, {"tr", "table"}),
    "th": ({"td", "th"}, {"tr", "table"}),
    "thead": ({"thead", "tbody", "tfoot", "tr", "td", "th"}, {"table"}),
    "tbody": ({"thead", "tbody", "tfoot", "tr", "td", "th"}, {"table"}),
    "tfoot": ({"thead", "tbody", "tfoot", "tr", "td", "th"}, {"table"}),
    "option": ({"option"}, {"select", "datalist"}),
    "optgroup": ({"option", "optgroup"}, {"select"}),
}
CLOSES_P = {"address", "article", "aside", "blockquote", "details", "div", "dl", "fieldset", "figcaption", "figure",
            "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "main", "menu", "nav", "ol", "p",
            "pre", "section", "table", "ul"}


class Node:
    """An element (tag set) or a text node (tag None, text set)."""

    __slots__ = ("tag", "attrs", "children", "text")

    def __init__(self, tag: str | None, attrs: list | None = None, text: str = ""):
        self.tag = tag
        self.attrs = attrs or []
        self.children: list[Node] = []
        self.text = text

    def attr(self, name: str) -> str:
        """The first value of attribute `name`, or ""."""
        for key, value in self.attrs:
            if key == name:
                return value or ""
        return ""


class _TreeBuilder(HTMLParser):
    """A lenient DOM builder: void elements, implied end tags, stray end tags ignored.

    Linear in the document: where each tag name is open on the stack is kept (`open`), so an end tag or
    an implied end finds its element without walking the stack, and text is joined once at the end.
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document")
        self.stack = [self.root]
        self.open: dict[str, list[int]] = {}  # tag -> stack positions of its open elements, innermost last
        self.texts: list[Node] = []  # text nodes, their text a list of pieces until close() joins it

    def handle_starttag(self, tag, attrs):
        self._imply_end(tag)
        node = Node(tag, attrs)
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.open.setdefault(tag, []).append(len(self.stack))
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self._imply_end(tag)
        self.stack[-1].children.append(Node(tag, attrs))

    def handle_endtag(self, tag):
        where = self.open.get(tag)
        if where:
            self._close_from(where[-1])

    def handle_data(self, data):
        children = self.stack[-1].children
        if children and children[-1].tag is None:
            children[-1].text.append(data)
        else:
            node = Node(None)
            node.text = [data]
            self.texts.append(node)
            children.append(node)

    def _close_from(self, i: int) -> None:
        """Close the element at stack position `i` and every one inside it."""
        for node in self.stack[i:]:
            self.open[node.tag].pop()
        del self.stack[i:]

    def _imply_end(self, tag: str) -> None:
        names, boundaries = IMPLIED_END.get(tag, (set(), set()))
        if tag in CLOSES_P:
            names, boundaries = names | {"p"}, boundaries | {"button", "table", "td", "th"}
        innermost = 0
        for name in names:
            where = self.open.get(name)
            if where and where[-1] > innermost:
                innermost = where[-1]
        if not innermost:
            return
        for name in boundaries:
            where = self.open.get(name)
            if where and where[-1] > innermost:
                return
        self._close_from(innermost)

    def close(self):
        super().close()
        for node in self.texts:
            node.text = "".join(node.text)
        self.texts = []


def parse(document: str, check=lambda: None) -> Node:
    """Parse HTML into a tree with html, head and body elements, like an HTML5 parser would.

    The text is fed in pieces, with a `check()` (ctx.check: a timeout past the deadline) before each.
    """
    builder = _TreeBuilder()
    for start in range(0, len(document), 65536):
        check()
        builder.feed(document[start:start + 65536])
    builder.close()
    return _complete(builder.root)


def _complete(root: Node) -> Node:
    html = next((c for c in root.children if c.tag == "html"), None)
    if html is None:
        html = Node("html")
        html.children, root.children = root.children, [html]
    kids = html.children
    if not any(c.tag == "head" for c in kids):
        head = Node("head")
        while kids and (kids[0].tag in HEAD_ONLY or (kids[0].tag is None and not kids[0].text.strip())):
            head.children.append(kids.pop(0))
        kids.insert(0, head)
    if not any(c.tag == "body" for c in kids):
        body = Node("body")
        body.children = kids[1:]
        del kids[1:]
        kids.append(body)
    return root


def find_all(node: Node, match, tick=lambda n=1: None) -> list[Node]:
    """Matching nodes in document order, not descending into a node that matched."""
    found: list[Node] = []
    pending = [node]
    while pending:
        tick()
        current = pending.pop()
        if match(current):
            found.append(current)
        else:
            pending.extend(reversed(current.children))
    return found


def text_of(node: Node, tick=lambda n=1: None) -> str:
    """Every descendant text node, trimmed, empty ones dropped, joined by single spaces."""
    if node.tag is None:
        pieces = [node.text]
    else:
        pieces = [n.text for n in find_all(node, lambda n: n.tag is None, tick)]
    return " ".join(p.strip() for p in pieces if p.strip())


def by_class(name: str):
    return lambda n: n.tag is not None and name in n.attr("class").split()


def by_id(value: str):
    return lambda n: n.tag is not None and n.attr("id") == value


def by_tag(tag: str):
    tag = tag.lower()
    return lambda n: n.tag == tag


# The Lua module ###############################################################


def _loader(ctx):
    def matches(document, matcher) -> list[Node]:
        document = check_string(document, 1)
        ctx.fits(2 * text_cost(document) + NODE_COST * document.count("<"), "the tree of this document")
        return find_all(parse(document, ctx.check), matcher, ticker(ctx.check))

    def attr_finder(make_matcher):
        def find(document=None, attr=None, query=None):
            """The attribute `attr` of every matching node ("" where missing)."""
            attr, query = check_string(attr, 2).lower(), check_string(query, 3)
            return [n.attr(attr) for n in matches(document, make_matcher(query))], None

        return find

    def attrs_finder(make_matcher):
        def find(document=None, count=None, *rest):
            """`{attr = value}` maps for every match; the count of attribute names comes first, the query last."""
            count = check_integer(count, 2)
            if count < 0:
                raise ArgError(2, "the count of attribute names cannot be negative")
            if count >= len(rest):  # fewer arguments than the count says: the first missing one is reported
                check_string(None, 3 + len(rest))
            names = [check_string(rest[i], 3 + i) for i in range(count)]
            query = check_string(rest[count], 3 + count)
            return [{a: n.attr(a.lower()) for a in names} for n in matches(document, make_matcher(query))], None

        return find

    def text_finder(make_matcher):
        def find(document=None, query=None):
            """The text of every matching node."""
            query = check_string(query, 2)
            tick = ticker(ctx.check)
            return [text_of(n, tick) for n in matches(document, make_matcher(query))], None

        return find

    members = {}
    for suffix, matcher in (("class", by_class), ("id", by_id), ("tag", by_tag)):
        members[f"find_attr_by_{suffix}"] = attr_finder(matcher)
        members[f"find_attrs_by_{suffix}"] = attrs_finder(matcher)
        members[f"find_text_by_{suffix}"] = text_finder(matcher)
    return members


def lua_modules() -> dict:
    """Register `scrape`."""
    return {"scrape": _loader}
