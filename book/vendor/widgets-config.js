// Loaded between require.js and the ipywidgets manager (html-manager/embed-amd.js). The manager
// finds its icon fonts next to the URL that RequireJS gives its modules, by default a path under
// the page's folder (chapters/@jupyter-widgets/html-manager/dist/), where there is nothing. Map
// its modules to the folder it really is in, next to this script.
(function () {
  var here = document.currentScript.src.replace(/[^/]*$/, "");
  require.config({
    paths: {
      "@jupyter-widgets/html-manager": here + "html-manager/html-manager",
      "@jupyter-widgets/html-manager/dist": here + "html-manager",
    },
  });
})();

// The manager typesets widget labels with MathJax 2's MathJax.Hub.Queue when no other typesetter is
// set; the book loads MathJax 3, which has no Hub. Give it one that calls MathJax 3 once MathJax is
// ready. Registered before the manager's own load handler (this script comes first), so it is in
// place when the widgets render; MathJax's async script has run by the load event.
window.addEventListener("load", function () {
  var mj = window.MathJax;
  if (mj && mj.startup && !mj.Hub) {
    mj.Hub = {
      Queue: function (job) {
        var element = job[2]; // ["Typeset", MathJax.Hub, element]
        return mj.startup.promise.then(function () {
          return mj.typesetPromise([element]);
        });
      },
    };
  }
});
