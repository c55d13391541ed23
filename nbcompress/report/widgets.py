"""The ipywidgets dashboard. ipywidgets is imported inside the functions only, so the rest of the
report layer works where it is missing or has no front end.

Only ``HTML``, ``Image``, ``Tab`` and boxes are used: every widget is filled when it is built,
nothing needs a live kernel to be filled later (no ``Output`` widgets, no callbacks), so a saved
widget state renders the same as the live one.
"""
from __future__ import annotations

from typing import Any

from . import html as H
from .step import WIDGET_MIME, StepReport, _filter, display_mode, kernel_has_comms, widget_view

TAB_TITLES = ("Metrics", "Layers", "History", "Details")


def _image(W, png: bytes):
    return W.Image(value=png, format="png",
                   layout=W.Layout(width=H.css_width(png), max_width="100%", height="auto",
                                   margin="4px 0 0 0", object_fit="contain"))


def _html(W, body: str):
    return W.HTML(value=H.fragment(body), layout=W.Layout(width="auto"))


def _muted(text: str) -> str:
    return f'<div style="color:{H.MUTED};padding:6px 0;">{H.escape(text)}</div>'


def build_parts(report: StepReport) -> tuple[Any, Any]:
    """(headline widget, tab widget) for one report."""
    import ipywidgets as W

    header = _html(W, report.summary_html())

    metrics = _html(W, report.metrics_html())

    layer_children = [_html(W, report.layers_html())]
    png = report.layers_png()
    if png:
        layer_children.append(_image(W, png))
    layers = W.HBox(layer_children, layout=W.Layout(flex_flow="row wrap",
                                                    align_items="flex-start",
                                                    grid_gap="8px 24px"))

    hpng = report.history_png()
    if hpng:
        history = W.VBox([_image(W, hpng),
                          _html(W, H.history_table_html(report.history))])
    else:
        history = _html(W, _muted("no history recorded for this name yet"))

    details_children = []
    body = report.details_html()
    details_children.append(_html(W, body or _muted("no notes for this step")))
    details = W.VBox(details_children)

    tabs = W.Tab(children=[metrics, layers, history, details])
    tabs.titles = TAB_TITLES
    return header, tabs


def build_widget(report: StepReport):
    import ipywidgets as W

    header, tabs = build_parts(report)
    return W.VBox([header, tabs], layout=W.Layout(width="100%", max_width="1100px"))


def _close_tree(w) -> None:
    for c in getattr(w, "children", ()) or ():
        _close_tree(c)
    try:
        w.close()
    except Exception:  # noqa: BLE001
        pass


class Dashboard:
    """One live dashboard per model name, refreshed in place.

    ``Dashboard.for_name("model", report)`` gives the dashboard of that name (made on first use,
    updated after): display it once, and later steps, ``%undo`` or ``%redo`` call ``update`` so the
    dashboard already on screen shows the new version. ``update`` replaces the box's children
    with freshly built ones (the selected tab is kept).
    """

    _registry: dict = {}

    def __init__(self, report: StepReport | None = None):
        import ipywidgets as W

        self.box = W.VBox([], layout=W.Layout(width="100%", max_width="1100px"))
        self.report: StepReport | None = None
        if report is not None:
            self.update(report)

    @classmethod
    def for_name(cls, name: str, report: StepReport | None = None) -> "Dashboard":
        d = cls._registry.get(name)
        if d is None:
            d = cls._registry[name] = cls(report)
        elif report is not None:
            d.update(report)
        return d

    @classmethod
    def forget(cls, name: str | None = None) -> None:
        """Drop the dashboard of ``name`` (all of them when None)."""
        if name is None:
            cls._registry.clear()
        else:
            cls._registry.pop(name, None)

    @property
    def widget(self):
        return self.box

    def update(self, report: StepReport) -> "Dashboard":
        header, tabs = build_parts(report)
        old = self.box.children
        if len(old) == 2 and getattr(old[1], "selected_index", None) is not None:
            tabs.selected_index = old[1].selected_index
        self.box.children = (header, tabs)
        self.report = report
        for w in old:  # free the front-end models of the replaced widgets
            _close_tree(w)
        return self

    def __repr__(self) -> str:
        return repr(self.report) if self.report is not None else "Dashboard (empty)"

    def _repr_html_(self) -> str | None:
        return self.report._repr_html_() if self.report is not None else None

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        bundle = self.report._repr_mimebundle_() if self.report is not None else {
            "text/plain": repr(self)}
        bundle.pop(WIDGET_MIME, None)
        if display_mode() == "auto" and kernel_has_comms():
            view = widget_view(self.box)
            if view:
                bundle[WIDGET_MIME] = view
        return _filter(bundle, include, exclude)
