// Loaded between vendor/require.js and vendor/html-manager/embed-amd.js (see
// nb_ipywidgets_js in _config.yml). The widget bundle derives the URL of its
// web fonts from the RequireJS module path of @jupyter-widgets/html-manager;
// map that path to the vendored copy next to this file so that the fonts load
// from _static/ on every page, whatever its depth.
(function () {
  var src = document.currentScript && document.currentScript.src;
  if (!src || typeof window.require === "undefined") return;
  var base = src.substring(0, src.lastIndexOf("/") + 1);
  window.require.config({
    paths: { "@jupyter-widgets/html-manager/dist": base + "vendor/html-manager" },
  });
})();
