/*
 * Import nucli's nuclei into the images of a QuPath project (QuPath 0.4 or newer).
 *
 * In QuPath: Automate > Script editor > File > Open... this file, then
 *   Run > Run for project  (tick the images; QuPath saves each image's data), or
 *   Run                    (only the image that is open).
 * Headless: QuPath script --project=/path/to/project.qpproj --save import_nucli_results.groovy
 *
 * For an image called NAME.EXT the script looks in RESULTS_DIR for, in this order,
 *   NAME.geojson, NAME.geojson.gz, NAME/nuclei.geojson
 * (examples/pipeline_folder.sh writes the first form; `nucli segment NAME.svs -o NAME.geojson`
 * too). nucli writes coordinates in full-resolution pixels of the slide, QuPath's own frame, so
 * the outlines land on their nuclei with no offset.
 *
 * Detections (nuclei) and cells (`nucli segment --objects cells`: nucleus + cell boundary) are
 * imported alike, with their classes: Nucleus / Cell, or Positive / Negative (1+ / 2+ / 3+) with
 * `--positivity dab`, in QuPath's own colours. The script prints how many of each class it imported.
 */

import java.util.zip.GZIPInputStream

import qupath.lib.io.PathIO

// ---------------------------------------------------------------- settings
// Folder holding nucli's outputs. null: the folder "nucli" inside the project folder.
String RESULTS_DIR = null
// Remove nuclei and cells imported from nucli earlier, so that running the script again replaces
// them instead of adding a second copy: detections and cells carrying nucli's measurement
// "Nucleus: Equivalent diameter px" (QuPath's own detections have none), and detections of class
// "Nucleus" (files of older nucli versions). Annotations and other objects are kept.
boolean REPLACE_PREVIOUS = true
String NUCLI_MEASUREMENT = "Nucleus: Equivalent diameter px"
// ---------------------------------------------------------------- end of settings

def imageData = getCurrentImageData()
if (imageData == null) {
    println "No image is open: open one, or use Run > Run for project"
    return
}
def server = imageData.getServer()
def entry = getProjectEntry()
String imageName = entry != null ? entry.getImageName() : server.getMetadata().getName()
String stem = GeneralTools.getNameWithoutExtension(imageName)

File dir
if (RESULTS_DIR != null) {
    dir = new File(RESULTS_DIR)
} else if (getProject() != null) {
    dir = new File(buildFilePath(PROJECT_BASE_DIR, "nucli"))
} else {
    println "No project is open: set RESULTS_DIR at the top of the script"
    return
}
if (!dir.isDirectory()) {
    println "Results folder not found: ${dir} (set RESULTS_DIR at the top of the script)"
    return
}

def candidates = [new File(dir, stem + ".geojson"), new File(dir, stem + ".geojson.gz"),
                  new File(new File(dir, stem), "nuclei.geojson")]
def file = candidates.find { it.isFile() }
if (file == null) {
    println "${imageName}: no nucli results (looked for ${candidates*.name.join(', ')} in ${dir})"
    return
}

List objects
if (file.name.toLowerCase().endsWith(".gz")) {
    def stream = new GZIPInputStream(new FileInputStream(file))
    try {
        objects = PathIO.readObjectsFromGeoJSON(stream)
    } finally {
        stream.close()
    }
} else {
    objects = PathIO.readObjects(file)
}

// A nucleus outside the image means the file belongs to another image (or another series
// of a multi-image file): stop rather than import misplaced objects.
int width = server.getWidth(), height = server.getHeight()
def outside = objects.findAll {
    def roi = it.getROI()
    roi.getBoundsX() + roi.getBoundsWidth() > width + 1 || roi.getBoundsY() + roi.getBoundsHeight() > height + 1
}
if (!outside.isEmpty()) {
    println "${imageName}: ${outside.size()} of ${objects.size()} objects in ${file.name} lie outside the " +
            "${width} x ${height} px image; is it the result of another image? Nothing imported."
    return
}

if (REPLACE_PREVIOUS) {
    def nucleusClass = getPathClass("Nucleus")
    def previous = getDetectionObjects().findAll {
        it.getMeasurementList().containsKey(NUCLI_MEASUREMENT) || it.getPathClass() == nucleusClass
    }
    if (!previous.isEmpty()) {
        removeObjects(previous, true)
        println "${imageName}: removed ${previous.size()} objects imported from nucli earlier"
    }
}
addObjects(objects)
fireHierarchyUpdate()
if (entry != null) {
    entry.saveImageData(imageData)
}
int cells = objects.count { it.isCell() }
def classes = objects.countBy { it.getPathClass() == null ? "Unclassified" : it.getPathClass().toString() }
String what = cells > 0 ? "${cells} cells" : "${objects.size()} nuclei"
println "${imageName}: imported ${what} from ${file} (" +
        classes.collect { k, v -> "${k}: ${v}" }.join(", ") + ")"
def positive = classes.findAll { k, v -> k in ["Positive", "1+", "2+", "3+"] }.values().sum(0)
if (classes.containsKey("Negative") || positive > 0) {
    println String.format("%s: %.1f %% positive", imageName, 100.0 * positive / Math.max(objects.size(), 1))
}
