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
