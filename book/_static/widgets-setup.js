// Loaded between vendor/require.js and vendor/html-manager/embed-amd.js (see
// nb_ipywidgets_js in _config.yml), on pages that hold saved widget state.
(function () {
  // 1. The widget bundle derives the URL of its web fonts from the RequireJS
  //    module path of @jupyter-widgets/html-manager: map that path to the
  //    vendored copy next to this file, so that the fonts load from _static/
  //    on every page, whatever its depth.
  var src = document.currentScript && document.currentScript.src;
  if (src && typeof window.require !== "undefined") {
    var base = src.substring(0, src.lastIndexOf("/") + 1);
    window.require.config({
      paths: { "@jupyter-widgets/html-manager/dist": base + "vendor/html-manager" },
    });
  }
  // 2. The widget bundle typesets widget labels through MathJax 2's
  //    MathJax.Hub.Queue; the book loads MathJax 3, which has no Hub. Once the
  //    (deferred) MathJax 3 script has run, give it a Hub.Queue that forwards
  //    "Typeset" requests to MathJax 3's typesetPromise.
  window.addEventListener("DOMContentLoaded", function () {
    var mj = window.MathJax;
    if (!mj || mj.Hub || !mj.version || String(mj.version).charAt(0) !== "3") return;
    mj.Hub = {
      Queue: function () {
        for (var i = 0; i < arguments.length; i++) {
          var job = arguments[i];
          if (typeof job === "function") {
            job();
          } else if (job && job[0] === "Typeset" && mj.typesetPromise) {
            var el = job[2];
            (mj.startup && mj.startup.promise ? mj.startup.promise : Promise.resolve())
              .then(function () { return mj.typesetPromise(el ? [el] : undefined); })
              .catch(function () {});
          }
        }
      },
    };
  });
})();
