// The kernel-free form of derprop.viewer.Viewer (derprop/viewer.py, frames_html): every frame is in the
// page, one <figure data-key="i,j,..."> per combination of the controls' values; show the selected one.
function derpropFrameViewers() {
  document.querySelectorAll(".derprop-frames").forEach((root) => {
    const controls = Array.from(root.querySelectorAll("[data-axis]"))
      .sort((a, b) => Number(a.dataset.axis) - Number(b.dataset.axis));
    const figures = Array.from(root.querySelectorAll("figure[data-key]"));
    const show = () => {
      const key = controls.map((c) => c.value).join(",");
      figures.forEach((f) => { f.hidden = f.dataset.key !== key; });
      controls.filter((c) => c.dataset.labels).forEach((c) => {
        c.parentElement.querySelector("output").textContent = JSON.parse(c.dataset.labels)[Number(c.value)];
      });
    };
    controls.forEach((c) => {
      c.disabled = false;
      c.addEventListener("input", show);
      c.addEventListener("change", show);
    });
    show();
  });
}
if (document.readyState === "loading") {
  document.addEventListener("DOMContentLoaded", derpropFrameViewers);
} else {
  derpropFrameViewers();
}
